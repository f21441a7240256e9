"""Run nsa_attention's xla implementation at long context on whatever device JAX sees and report
compiled temporary memory, wall time and peak host memory — evidence that its memory grows with
T * (keys per query), not T^2.

    python experiments/xla_long_context.py --length 16384 --q-heads 16
"""
from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from nsa_jax import NSAConfig, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--q-heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-backward", action="store_true")
    args = parser.parse_args()

    cfg = NSAConfig()
    t, hq, hkv, d = args.length, args.q_heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (1, t, hq, d))
    k = jax.random.normal(keys[1], (1, t, hkv, d))
    v = jax.random.normal(keys[2], (1, t, hkv, d))
    g = jax.nn.sigmoid(jax.random.normal(keys[3], (1, t, hq, 3)))
    loss = lambda *a: jnp.sum(ops.nsa_attention(*a, cfg, implementation="xla") ** 2)
    runs = [("forward", jax.jit(loss))]
    if not args.no_backward:
        runs.append(("forward+backward", jax.jit(jax.grad(loss, (0, 1, 2, 3)))))
    print(f"{jax.devices()[0].device_kind}: B=1 T={t} Hq={hq} Hkv={hkv} D={d} {cfg}")
    for name, fn in runs:
        compiled = fn.lower(q, k, v, g).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, g))
        print(f"{name:17s} temp memory {temp / 2**20:8.1f} MiB   time {time.perf_counter() - start:7.1f} s")
    dense = t * t * hq * 4
    print(f"(one float32 [T, T] score matrix per head would be {dense / 2**20:.0f} MiB); "
          f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
