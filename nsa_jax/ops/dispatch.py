"""The one place that chooses an implementation for an op.

Every public op validates its arguments and then calls `run(op, implementation, ...)`.
Implementations register themselves per op: "reference" (the dense oracle), "xla" (chunked
gathers, the portable default) and "pallas" (kernels, registered from `pallas_ops.py`). An op with
no Pallas kernel yet runs its xla implementation when "pallas" is asked for, so
`implementation="pallas"` always means "kernels wherever they exist".
"""
from __future__ import annotations

import functools

import jax

IMPLEMENTATIONS = ("reference", "xla", "pallas")
_REGISTRY: dict[str, dict[str, callable]] = {}


def register(op: str, implementation: str):
    def wrap(fn):
        _REGISTRY.setdefault(op, {})[implementation] = fn
        return fn
    return wrap


@functools.cache
def pallas_backend() -> bool:
    """Pallas kernels run compiled on GPU and TPU; elsewhere they run in interpret mode (slow, for
    tests)."""
    return jax.default_backend() in ("gpu", "tpu")


def resolve(implementation) -> str:
    if implementation is None:
        return "pallas" if pallas_backend() else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    return implementation


def run(op: str, implementation, *args, **kwargs):
    impl = resolve(implementation)
    if impl == "pallas":
        from nsa_jax.ops import pallas_ops  # noqa: F401  (registers the kernels that exist)
    table = _REGISTRY[op]
    return table.get(impl, table["xla"])(*args, **kwargs)
