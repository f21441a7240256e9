"""Configuration dataclasses. `NSAConfig` holds the NSA hyper-parameters and validates them once,
when constructed, so every op can trust it."""
from __future__ import annotations

import dataclasses


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"NSAConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"NSAConfig.{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """NSA hyper-parameters (notation of nsa_spec.md: l, d, l', n, w).

    The defaults are the paper's: compression blocks of l=32 tokens every d=16 tokens, selection
    blocks of l'=64 tokens, n=16 selected blocks of which block 0 and the current and previous
    block are always chosen, and a sliding window of w=512 keys ([t - w + 1, t]).
    """

    compress_block: int = 32  # l: tokens per compressed token
    compress_stride: int = 16  # d: stride between compressed tokens (d | l, d | l')
    select_block: int = 64  # l': tokens per selection block
    num_selected: int = 16  # n: selected blocks per query, forced ones included
    num_init_blocks: int = 1  # leading blocks always selected
    num_local_blocks: int = 2  # current block and the ones before it, always selected
    window: int = 512  # w: sliding-window keys, the query's own token included

    def __post_init__(self):
        _require_int("compress_block", self.compress_block, 1)
        _require_int("compress_stride", self.compress_stride, 1)
        _require_int("select_block", self.select_block, 1)
        _require_int("num_selected", self.num_selected, 1)
        _require_int("num_init_blocks", self.num_init_blocks, 0)
        _require_int("num_local_blocks", self.num_local_blocks, 0)
        _require_int("window", self.window, 1)
        l, d, lp = self.compress_block, self.compress_stride, self.select_block
        if l % d:
            raise ValueError(
                f"NSAConfig.compress_stride (d={d}) must divide compress_block (l={l}): compressed "
                "tokens are built from whole stride-d chunks")
        if lp % d:
            raise ValueError(
                f"NSAConfig.compress_stride (d={d}) must divide select_block (l'={lp}): block "
                "scores map compressed tokens onto selection blocks chunk by chunk")
        forced = self.num_init_blocks + self.num_local_blocks
        if self.num_selected < forced:
            raise ValueError(
                f"NSAConfig.num_selected (n={self.num_selected}) must be >= num_init_blocks + "
                f"num_local_blocks = {forced}: forced blocks count toward n")

    def num_compressed(self, length: int) -> int:
        """Compressed tokens of one unpacked sequence of `length` tokens."""
        l, d = self.compress_block, self.compress_stride
        return 0 if length < l else (length - l) // d + 1

    def num_blocks(self, length: int) -> int:
        """Selection blocks covering `length` tokens (the last one may be partial)."""
        return -(-length // self.select_block)


ATTENTION_KINDS = ("nsa", "full", "window")
COMPRESSOR_KINDS = ("mean", "linear", "mlp")
# ops.IMPLEMENTATIONS plus None; spelt out here because the config sits upstream of ops
IMPLEMENTATIONS = (None, "reference", "xla", "pallas")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _require_model_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"ModelConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"ModelConfig.{name} must be >= {minimum}, got {value}")


def _require_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder language model: sizes, attention kind and numerics, validated on construction.

    `attention` picks the token mixer of every layer: "nsa" (NSAAttention with `nsa` as its
    hyper-parameters), "full" (dense causal attention) or "window" (dense causal attention over the
    last `nsa.window` keys). `compressor` is NSA's learned compression phi ("mean", "linear",
    "mlp"); `separate_branch_kv` gives each NSA branch its own K/V projections (paper §3.3.3)
    instead of one shared set. `implementation` is passed to the NSA ops (None: fastest that runs).
    `v_head_dim=None` means `head_dim`; `compressor_hidden` is the hidden width of the "mlp" phi.
    """

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 64
    v_head_dim: int | None = None
    mlp_hidden: int = 768
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    attention: str = "nsa"
    compressor: str = "mean"
    compressor_hidden: int = 256
    separate_branch_kv: bool = False
    nsa: NSAConfig = dataclasses.field(default_factory=NSAConfig)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations; softmax statistics stay float32
    remat: bool = False
    implementation: str | None = None

    def __post_init__(self):
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "v_head_dim", "mlp_hidden", "compressor_hidden"):
            _require_model_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): query head h uses KV head h // G")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (RoPE rotates pairs), got "
                             f"{self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        _require_choice("attention", self.attention, ATTENTION_KINDS)
        _require_choice("compressor", self.compressor, COMPRESSOR_KINDS)
        _require_choice("implementation", self.implementation, IMPLEMENTATIONS)
        _require_choice("param_dtype", self.param_dtype, DTYPE_NAMES)
        _require_choice("dtype", self.dtype, DTYPE_NAMES)
        for name in ("separate_branch_kv", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.nsa, NSAConfig):
            raise ValueError(f"ModelConfig.nsa must be an NSAConfig, got {type(self.nsa).__name__}")
        if self.attention != "nsa" and self.v_head_dim != self.head_dim:
            raise ValueError(
                f"ModelConfig.v_head_dim ({self.v_head_dim}) must equal head_dim ({self.head_dim}) "
                f"for attention={self.attention!r}: jax.nn.dot_product_attention needs Dk == Dv")

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.num_heads // self.num_kv_heads
