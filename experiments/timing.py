"""Device time of a jitted function, with little noise even for sub-millisecond kernels.

One `fn(*args)` timed alone by the wall clock also measures the host: dispatch, the
block_until_ready round trip and scheduling jitter, tens to hundreds of microseconds that swamp
a 0.3 ms kernel (the H200 runs of 2026-11-30 measured the same 8k kernel at 0.75 and 0.37 ms).

`device_ms` instead enqueues `fn` `reps` times back to back and blocks once on the last result.
JAX dispatch is asynchronous and one device executes its launches in order, so the device runs
the calls as one queue without host gaps (as long as a call takes longer to run than to
dispatch, true of kernels above ~50 us); the single block's overhead is spread over `reps` calls.
`reps` is chosen so that one sample lasts at least `min_sample_ms`; the result is the median
over `samples` of (sample wall time / reps). Only the last call's outputs are kept alive, so
memory stays at one call's outputs plus those in flight.

Usage:  from experiments.timing import device_ms;  ms = device_ms(jax.jit(f), x, y)
"""
from __future__ import annotations

import math
import statistics
import time

import jax


def _run_ms(fn, args, reps: int) -> float:
    """Wall milliseconds of `reps` back-to-back calls and one block at the end."""
    start = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - start)


def device_ms(fn, *args, samples: int = 5, min_sample_ms: float = 25.0, max_reps: int = 200,
              warmup: int = 1) -> float:
    """Median milliseconds per call of `fn(*args)` (fn already jitted, so the first warm-up call
    compiles it). See the module docstring for the method."""
    if samples < 1 or warmup < 1 or max_reps < 1:
        raise ValueError(f"samples, warmup, max_reps must be >= 1, got {samples}, {warmup}, "
                         f"{max_reps}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    once = _run_ms(fn, args, 1)  # includes one host round trip: an upper bound on a call
    reps = max(1, min(max_reps, math.ceil(min_sample_ms / max(once, 1e-3))))
    return statistics.median(_run_ms(fn, args, reps) / reps for _ in range(samples))
