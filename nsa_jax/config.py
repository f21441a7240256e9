"""The library's configuration: `NSAConfig` (NSA hyper-parameters) and `ModelConfig` (the decoder
LM), both validated once, when constructed, so every op and layer can trust them; and the value
checks every config section of the package uses (`require_int`, `require_number`,
`require_choice`, `from_mapping` for unknown keys), so each error reads the same way.

A run's config file (train, data, optimizer, mesh, eval sections) is resolved by
`nsa_jax.train.run_config`; the data section is `nsa_jax.data.DataConfig`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

# Every op's `implementation=` choices; None picks the fastest that runs here (ops.dispatch).
IMPLEMENTATIONS = ("reference", "xla", "pallas")
ATTENTION_KINDS = ("nsa", "full", "window")
COMPRESSOR_KINDS = ("mean", "linear", "mlp")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def require_int(where: str, value, minimum: int) -> None:
    """`where` names the value as the user wrote it, e.g. "NSAConfig.window" or "config steps".
    Python and numpy ints pass; bools do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where} must be an int >= {minimum}, got {value!r}")


def require_number(where: str, value, minimum: float, *, inclusive: bool = True,
                   maximum: float = math.inf, maximum_inclusive: bool = True) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= minimum if inclusive else value > minimum)
          and (value <= maximum if maximum_inclusive else value < maximum))
    if not ok:
        low, high = "[" if inclusive else "(", "]" if maximum_inclusive else ")"
        raise ValueError(f"{where} must be a number in {low}{minimum}, {maximum}{high}, "
                         f"got {value!r}")


def require_choice(where: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value!r}")


def require_bool(where: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be True or False, got {value!r}")


def check_keys(values, valid, section: str) -> None:
    """A key of `values` not in `valid` is a ValueError that names the valid keys."""
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section {section!r}; "
                         f"valid keys: {list(valid)}")


def from_mapping(cls, values, section: str):
    """cls(**values) for a dict / ConfigDict section, its keys checked by `check_keys`."""
    values = dict(values.items())
    check_keys(values, [f.name for f in dataclasses.fields(cls)], section)
    return cls(**values)


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
        for name, minimum in (("compress_block", 1), ("compress_stride", 1), ("select_block", 1),
                              ("num_selected", 1), ("num_init_blocks", 0),
                              ("num_local_blocks", 0), ("window", 1)):
            require_int(f"NSAConfig.{name}", getattr(self, name), minimum)
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

    def num_visible_compressed(self, position):
        """Compressed tokens a query at document-relative `position` t sees: those i with
        i*d + l - 1 <= t (nsa_spec.md §2.1), i.e. (t - l + 1) // d + 1, or 0 while t < l - 1.
        An int for an int position, an int array for an int array."""
        # One expression for ints and arrays: (t - l + 1 + d) // d, clamped below at 0.
        past = position - self.compress_block + 1 + self.compress_stride
        return (past * (past > 0)) // self.compress_stride

    def num_compressed(self, length: int) -> int:
        """Compressed tokens of one unpacked sequence of `length` tokens: those its last token
        sees, (T - l) // d + 1 (0 if T < l)."""
        return self.num_visible_compressed(length - 1)

    def num_blocks(self, length: int) -> int:
        """Selection blocks covering `length` tokens (the last one may be partial)."""
        return -(-length // self.select_block)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder language model: sizes, attention kind and numerics, validated on construction.

    `attention` picks the token mixer of every layer: "nsa" (NSAAttention with `nsa` as its
    hyper-parameters), "full" (dense causal attention) or "window" (dense causal attention over the
    last `nsa.window` keys). `compressor` is NSA's learned compression phi ("mean", "linear",
    "mlp"); `separate_branch_kv` gives each NSA branch its own K/V projections (paper §3.3.3)
    instead of one shared set. `implementation` is passed to the NSA ops (None: fastest that runs).
    `v_head_dim=None` means `head_dim`; `compressor_hidden` is the hidden width of the "mlp" phi.

    `gate_bias_init` (NSA only): the gate biases at initialisation in branch order (cmp, slc, win);
    the gate weights start at zero, so every gate starts at sigmoid(bias). The default (-2, -2, 2),
    gates (0.12, 0.12, 0.88), follows LR (nsa_spec.md §1.1) and is PROVISIONAL. The evidence so far
    is issue 21's probe and cuts both ways: on an H200 (2k context, one seed each) NSA got 0.71 of
    the passkey digits right with it and 0.49 with every gate at 0.5 (bias 0), while CPU probes on
    a 1-layer retrieval task learned faster with gates at 0.5 in 2 of 3 seeds. Issue 21's study
    (configs/retrieval_4k_gates_half.py against configs/retrieval_4k_nsa.py, 3 seeds) decides it.
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
    gate_bias_init: tuple[float, float, float] = (-2.0, -2.0, 2.0)  # provisional, see docstring
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
            require_int(f"ModelConfig.{name}", getattr(self, name), 1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): query head h uses KV head h // G")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (RoPE rotates pairs), got "
                             f"{self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            require_number(f"ModelConfig.{name}", getattr(self, name), 0.0, inclusive=False)
        for name, choices in (("attention", ATTENTION_KINDS), ("compressor", COMPRESSOR_KINDS),
                              ("implementation", (None, *IMPLEMENTATIONS)),
                              ("param_dtype", DTYPE_NAMES), ("dtype", DTYPE_NAMES)):
            require_choice(f"ModelConfig.{name}", getattr(self, name), choices)
        for name in ("separate_branch_kv", "remat"):
            require_bool(f"ModelConfig.{name}", getattr(self, name))
        biases = self.gate_bias_init
        if not isinstance(biases, (tuple, list)) or len(biases) != 3:
            raise ValueError(f"ModelConfig.gate_bias_init must be 3 numbers (cmp, slc, win), got "
                             f"{biases!r}")
        for bias in biases:
            require_number("ModelConfig.gate_bias_init", bias, -math.inf)
        object.__setattr__(self, "gate_bias_init", tuple(float(b) for b in biases))
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
