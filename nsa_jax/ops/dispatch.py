"""The one place that chooses what runs for an op (in the manner of MaxText's attention op).

`TABLE[op][implementation][backend]` names what runs, as "module:function" strings imported on
first use (so no Pallas module is imported until a Pallas implementation is asked for, and
nothing registers itself at import time). A cell is one target, or an ordered list of
(condition, target) pairs: the first pair whose condition holds for the call's arguments runs, so
every fallback is written here and nowhere else. Conditions are the named functions below; each
takes the op's arguments.

implementation: "reference" (the dense oracle), "xla" (chunked gathers, runs anywhere), "pallas"
(kernels where they exist; the cells say what runs where they do not) or None (FASTEST[backend]).
An implementation an op has no entry for raises ValueError naming those it has.

backend (`backend()`): "cpu", "gpu" (CUDA before Hopper: Pallas-Triton kernels), "hopper" (CUDA
compute capability 9.x: Mosaic GPU kernels first, the Triton ones behind them), "tpu"; "*" in a
cell means every backend. On "cpu", "pallas" runs the Triton kernels in interpret mode (slow, for
tests).

Context parallelism (`ops.context_parallel`) calls compressed_attention, select,
selected_attention and window_attention with `query_offset`: q then holds one device's shard of
the queries and the other arrays the whole sequence (`layout.query_layout`). Only the xla and
reference targets take it; every other cell sends such calls to xla first (`query_shard`).

Targets under `pallas_kernels.` are kernels: they see whole arrays, so under a device mesh they
run per device (`per_device`), and on "cpu" they are called with interpret=True. Every target has
the signature of its op's implementation: (arrays..., cfg, *, keyword arguments), see each op.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from nsa_jax.config import IMPLEMENTATIONS
from nsa_jax.ops.per_device import per_device

BACKENDS = ("cpu", "gpu", "hopper", "tpu")


def backend() -> str:
    """The backend JAX computes on, as the table names it."""
    platform = jax.default_backend()
    if platform != "gpu":
        return platform
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    return "hopper" if capability.startswith("9.") else "gpu"


# --- Conditions: which inputs a kernel takes ------------------------------------------------------

def always(*args, **kwargs) -> bool:
    return True


def query_shard(*args, query_offset=None, **kwargs) -> bool:
    """q holds one device's shard of the queries: the kernels and cuDNN compute whole sequences."""
    return query_offset is not None


def triton_dtype(q, *args, **kwargs) -> bool:
    """The Triton compressed-attention and select kernels compute in bf16, f16 or f32 (not f64)."""
    return q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)


def triton_selected_dtype(q, *args, **kwargs) -> bool:
    """The Triton selected-attention kernels compute in bf16 or f32."""
    return q.dtype in (jnp.bfloat16, jnp.float32)


def tpu_dtype(q, *args, **kwargs) -> bool:
    """The TPU kernels compute in f32 or bf16."""
    return q.dtype in (jnp.float32, jnp.bfloat16)


def cudnn_window_fits(q, k, v, cfg, *, segment_ids=None, scale=None) -> bool:
    """cuDNN's fused attention: 16-bit inputs, Dk == Dv a multiple of 8 up to 256, and no packed
    documents (jax.nn.dot_product_attention has no segment ids)."""
    return segment_ids is None and _cudnn_dims(q, k, v)


def cudnn_decode_fits(q, k, v, position, *, window=None, scale=None) -> bool:
    """cuDNN's fused attention for one query over a full cache: 16-bit inputs, Dk == Dv a
    multiple of 8 up to 256, no window."""
    return window is None and _cudnn_dims(q, k, v)


def _cudnn_dims(q, k, v) -> bool:
    dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    return (q.dtype in (jnp.bfloat16, jnp.float16) and len(dims) == 1 and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256)


def mosaic_range_fits(*args, **kwargs) -> bool:
    """The Mosaic range-attention kernels (compressed and window branches): q, k, v in one 16-bit
    dtype, Dk and Dv in {64, 128} (pallas_kernels.gpu.mosaic.range_attention.supports)."""
    from pallas_kernels.gpu.mosaic import range_attention

    return range_attention.supports(*args, **kwargs)


def mosaic_scores_fits(*args, **kwargs) -> bool:
    """The Mosaic block-score kernel: 16-bit q and k_cmp, Dk a multiple of 64
    (pallas_kernels.gpu.mosaic.block_scores.supports)."""
    from pallas_kernels.gpu.mosaic import block_scores

    return block_scores.supports(*args, **kwargs)


def mosaic_selected_fits(*args, **kwargs) -> bool:
    """The Mosaic selected-attention kernels: q, k, v in one 16-bit dtype, G = Hq / Hkv <= 64,
    tiles fitting in SMEM (pallas_kernels.gpu.mosaic.selected_attention.supports)."""
    from pallas_kernels.gpu.mosaic import selected_attention

    return selected_attention.supports(*args, **kwargs)


def triton_decode_fits(*args, **kwargs) -> bool:
    """bf16, f16 or f32 caches with power-of-two head dims, select_block >= 16 and caches of
    whole selection blocks (pallas_kernels.gpu.triton.decode_attention.supports)."""
    from pallas_kernels.gpu.triton import decode_attention

    return triton_dtype(*args) and decode_attention.supports(*args, **kwargs)


# --- The table ------------------------------------------------------------------------------------

REF = "nsa_jax.ops.reference:"
CMP = "nsa_jax.ops.compression:"
SEL = "nsa_jax.ops.selection:"
WIN = "nsa_jax.ops.window:"
DEC = "nsa_jax.ops.decode_attention:"
TRITON = "pallas_kernels.gpu.triton."
MOSAIC = "pallas_kernels.gpu.mosaic."
TPU = "pallas_kernels.tpu."

FASTEST = {"cpu": "xla", "gpu": "pallas", "hopper": "pallas", "tpu": "pallas"}

TABLE = {
    "compress": {
        None: FASTEST,
        "reference": {"*": REF + "compress"},
        "xla": {"*": CMP + "compress_xla"},
        "pallas": {"*": CMP + "compress_xla"},  # a strided mean: no kernel
    },
    "compressed_attention": {
        None: FASTEST,
        "reference": {"*": REF + "compressed_attention"},
        "xla": {"*": CMP + "compressed_attention_xla"},
        "pallas": {
            "cpu": [(query_shard, CMP + "compressed_attention_xla"),
                    (triton_dtype, TRITON + "compressed_attention:compressed_attention"),
                    (always, CMP + "compressed_attention_xla")],
            "gpu": [(query_shard, CMP + "compressed_attention_xla"),
                    (triton_dtype, TRITON + "compressed_attention:compressed_attention"),
                    (always, CMP + "compressed_attention_xla")],
            "hopper": [(query_shard, CMP + "compressed_attention_xla"),
                       (mosaic_range_fits, MOSAIC + "range_attention:compressed_attention"),
                       (triton_dtype, TRITON + "compressed_attention:compressed_attention"),
                       (always, CMP + "compressed_attention_xla")],
            "tpu": [(query_shard, CMP + "compressed_attention_xla"),
                    (tpu_dtype, TPU + "compressed:compressed_attention"),
                    (always, CMP + "compressed_attention_xla")],
        },
    },
    "block_scores": {
        None: FASTEST,
        "reference": {"*": REF + "block_scores"},
        "xla": {"*": SEL + "block_scores_xla"},
        "pallas": {"*": SEL + "block_scores_xla"},  # the kernel fuses it into "select"
    },
    "select_blocks": {
        None: FASTEST,
        "reference": {"*": REF + "select_blocks"},
        "xla": {"*": SEL + "select_blocks_xla"},
        "pallas": {"*": SEL + "select_blocks_xla"},  # the kernel fuses it into "select"
    },
    "select": {  # block_scores + select_blocks, fused (nsa_attention's selection)
        None: FASTEST,
        "reference": {"*": REF + "select"},
        "xla": {"*": SEL + "select_xla"},
        "pallas": {
            "cpu": [(query_shard, SEL + "select_xla"),
                    (triton_dtype, TRITON + "select_blocks:select_blocks"),
                    (always, SEL + "select_xla")],
            "gpu": [(query_shard, SEL + "select_xla"),
                    (triton_dtype, TRITON + "select_blocks:select_blocks"),
                    (always, SEL + "select_xla")],
            "hopper": [(query_shard, SEL + "select_xla"),
                       (mosaic_scores_fits, MOSAIC + "block_scores:select"),
                       (triton_dtype, TRITON + "select_blocks:select_blocks"),
                       (always, SEL + "select_xla")],
            "tpu": SEL + "select_xla",
        },
    },
    "selected_attention": {
        None: FASTEST,
        "reference": {"*": REF + "selected_attention"},
        "xla": {"*": SEL + "selected_attention_xla"},
        "pallas": {
            "cpu": [(query_shard, SEL + "selected_attention_xla"),
                    (triton_selected_dtype, TRITON + "selected_attention:selected_attention"),
                    (always, SEL + "selected_attention_xla")],
            "gpu": [(query_shard, SEL + "selected_attention_xla"),
                    (triton_selected_dtype, TRITON + "selected_attention:selected_attention"),
                    (always, SEL + "selected_attention_xla")],
            "hopper": [(query_shard, SEL + "selected_attention_xla"),
                       (mosaic_selected_fits,
                        MOSAIC + "selected_attention:selected_attention_op"),
                       (triton_selected_dtype, TRITON + "selected_attention:selected_attention"),
                       (always, SEL + "selected_attention_xla")],
            "tpu": [(query_shard, SEL + "selected_attention_xla"),
                    (tpu_dtype, TPU + "selected:selected_attention"),
                    (always, SEL + "selected_attention_xla")],
        },
    },
    "window_attention": {
        None: FASTEST,
        "reference": {"*": REF + "window_attention"},
        "xla": {"*": WIN + "window_attention_xla"},
        "pallas": {
            "cpu": WIN + "window_attention_xla",  # cuDNN needs a GPU
            "gpu": [(query_shard, WIN + "window_attention_xla"),
                    (cudnn_window_fits, WIN + "window_attention_cudnn"),
                    (always, WIN + "window_attention_xla")],
            "hopper": [(query_shard, WIN + "window_attention_xla"),
                       (cudnn_window_fits, WIN + "window_attention_cudnn"),
                       (mosaic_range_fits, MOSAIC + "range_attention:window_attention"),
                       (always, WIN + "window_attention_xla")],
            "tpu": WIN + "window_attention_xla",
        },
    },
    "nsa_decode": {
        None: FASTEST,
        "reference": {"*": REF + "nsa_decode"},
        "xla": {"*": DEC + "nsa_decode_xla"},
        "pallas": {
            "cpu": [(triton_decode_fits, TRITON + "decode_attention:nsa_decode_attention"),
                    (always, DEC + "nsa_decode_xla")],
            "gpu": [(triton_decode_fits, TRITON + "decode_attention:nsa_decode_attention"),
                    (always, DEC + "nsa_decode_xla")],
            "hopper": [(triton_decode_fits, TRITON + "decode_attention:nsa_decode_attention"),
                       (always, DEC + "nsa_decode_xla")],
            "tpu": DEC + "nsa_decode_xla",
        },
    },
    "dense_decode": {
        None: FASTEST,
        "reference": {"*": DEC + "dense_decode_xla"},  # dense masks over the cache already
        "xla": {"*": DEC + "dense_decode_xla"},
        "pallas": {
            "cpu": DEC + "dense_decode_xla",  # cuDNN needs a GPU
            "gpu": [(cudnn_decode_fits, DEC + "dense_decode_cudnn"),
                    (always, DEC + "dense_decode_xla")],
            "hopper": [(cudnn_decode_fits, DEC + "dense_decode_cudnn"),
                       (always, DEC + "dense_decode_xla")],
            "tpu": DEC + "dense_decode_xla",
        },
    },
}


# --- Choosing and calling -------------------------------------------------------------------------

def check_implementation(implementation) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")


def choose(op: str, implementation, args, kwargs, on: str | None = None) -> str:
    """The target `run` calls for these arguments on backend `on` (default: this one)."""
    check_implementation(implementation)
    on = on or backend()
    row = TABLE[op]
    name = row[None][on] if implementation is None else implementation
    if name not in row:
        available = [i for i in row if i is not None]
        raise ValueError(f"{op} has no {name!r} implementation; it can run {available} "
                         f"or None")
    cell = row[name].get(on, row[name].get("*"))
    for condition, target in [(always, cell)] if isinstance(cell, str) else cell:
        if condition(*args, **kwargs):
            return target
    raise ValueError(f"no {name!r} implementation of {op} takes these arguments on {on}")


def load(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def run(op: str, implementation, *args, **kwargs):
    """The chosen target of `op` called with (args, kwargs): the op's validated arguments."""
    on = backend()
    target = choose(op, implementation, args, kwargs, on)
    fn = load(target)
    if not target.startswith("pallas_kernels."):
        return fn(*args, **kwargs)
    if on == "cpu":
        kwargs = {**kwargs, "interpret": True}
    return per_device(fn, *args, **kwargs)
