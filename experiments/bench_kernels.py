"""Benchmark of the Pallas selected-block attention kernels against cuDNN full causal attention.

Run on a GPU:  python experiments/bench_kernels.py [--seq 8192 16384 32768 65536] [--tune]
First checks the kernels against nsa_jax.ops' xla implementation (exit 1 on mismatch), then
prints one markdown table row per (shape, T): selected-branch forward and forward+backward times,
and their ratios to cuDNN causal attention measured in the same run; then the time per selected
(query head, key) pair at G=4 vs G=16. Block ids are random, distinct and causal, with the current
block always chosen.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from nsa_jax import ops
from nsa_jax.config import NSAConfig
from nsa_jax.layout import document_starts, positions, selected_block_starts
from pallas_kernels.gpu.triton.selected_attention import (Tiling, key_tile_entries,
                                                          query_tile_union, selected_attention)

SHAPES = {"paper": (64, 4), "small-group": (32, 8)}  # (Hq, Hkv); B=1, D=128, l'=64, n=16


def random_indices(key, b, t, h, block, n, shared=1):
    """`shared` consecutive queries (inside one block) draw the same selection, a stand-in for the
    overlap of neighbouring queries' selections in a trained model."""
    num_blocks = -(-t // block)
    current = (jnp.arange(t) // block)[None, :, None, None]
    blocks = jnp.arange(num_blocks)[None, None, None, :]
    score = jax.random.uniform(key, (b, -(-t // shared), h, num_blocks))
    score = jnp.repeat(score, shared, axis=1)[:, :t]
    score = jnp.where(blocks > current, -1.0, jnp.where(blocks == current, 2.0, score))
    value, idx = jax.lax.top_k(score, n)
    return jnp.where(value >= 0, idx, -1).astype(jnp.int32)


def value_and_grads(f, q, k, v, do):
    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(do.astype(o.dtype)))


def check(hq, hkv, dtype, packed, opts):
    """Relative L2 errors of o, dq, dk, dv against the xla implementation; False if any fails."""
    b, t, d, block, n = 2, 1024, 128, 64, 16
    keys = jax.random.split(jax.random.PRNGKey(hq * 100 + hkv), 5)
    q = jax.random.normal(keys[0], (b, t, hq, d), dtype)
    k = jax.random.normal(keys[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(keys[2], (b, t, hkv, d), dtype)
    do = jax.random.normal(keys[3], (b, t, hq, d), jnp.float32)
    segment_ids = None
    if packed:  # documents of 300, 421 and 303 tokens: block boundaries fall off the l' grid
        segment_ids = jnp.repeat(jnp.arange(3), jnp.asarray([300, 421, 303]),
                                 total_repeat_length=t)[None].repeat(b, 0)
    doc_start = document_starts(segment_ids, b, t)
    indices = random_indices(keys[4], b, t, hkv, block, n)
    indices = jnp.where(indices <= ((jnp.arange(t) - doc_start) // block)[..., None, None],
                        indices, -1)
    cfg = NSAConfig(select_block=block, num_selected=n)

    @functools.partial(jax.jit, static_argnums=0)
    def run(use_kernel, q, k, v, do, indices, segment_ids):
        if use_kernel:
            f = lambda q, k, v: selected_attention(q, k, v, indices, cfg, segment_ids=segment_ids,
                                                   tiling=Tiling(**opts))
        else:
            f = lambda q, k, v: ops.selected_attention(q, k, v, indices, cfg,
                                                       segment_ids=segment_ids,
                                                       implementation="xla")
        return value_and_grads(f, q, k, v, do)

    # Indices go in as arguments: as constants XLA would fold the index build at compile time.
    got, want = (run(use, q, k, v, do, indices, segment_ids) for use in (True, False))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-2  # float32 dots run as TF32
    f32 = lambda x: x.astype(jnp.float32)
    errs = [float(jnp.linalg.norm(f32(x) - f32(y)) / jnp.linalg.norm(f32(y)))
            for x, y in zip(got, want)]
    ok = all(e < tol for e in errs)
    print(f"check Hq={hq} Hkv={hkv} {jnp.dtype(dtype).name} packed={packed}: rel L2 "
          f"o/dq/dk/dv = {' '.join(f'{e:.1e}' for e in errs)} {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def median_ms(f, *args, iters=10, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def problem(t, hq, hkv, d=128, block=64, n=16, shared=1):
    keys = jax.random.split(jax.random.PRNGKey(t + hq), 5)
    q = jax.random.normal(keys[0], (1, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, hkv, d), jnp.bfloat16)
    do = jax.random.normal(keys[3], (1, t, hq, d), jnp.bfloat16)
    return q, k, v, do, random_indices(keys[4], 1, t, hkv, block, n, shared)


def time_selected(t, hq, hkv, opts, block=64, n=16, shared=1):
    q, k, v, do, idx = problem(t, hq, hkv, block=block, n=n, shared=shared)
    cfg = NSAConfig(select_block=block, num_selected=n)
    f = lambda q, k, v, idx: selected_attention(q, k, v, idx, cfg, tiling=Tiling(**opts))
    both = lambda q, k, v, idx, do: value_and_grads(lambda *x: f(*x, idx), q, k, v, do)
    return median_ms(jax.jit(f), q, k, v, idx), median_ms(jax.jit(both), q, k, v, idx, do)


def time_cudnn(t, hq, hkv):
    q, k, v, do, _ = problem(t, hq, hkv)
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                      implementation="cudnn")
    return (median_ms(jax.jit(f), q, k, v),
            median_ms(jax.jit(functools.partial(value_and_grads, f)), q, k, v, do))


def tune(t, opts):
    """Forward and fwd+bwd time at the paper shape for a few kernel settings."""
    print(f"\ntuning at T={t}, paper shape (ms): setting | fwd | fwd+bwd")
    grid = [dict(num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (2, 3)]
    grid += [dict(bwd_num_warps=w, bwd_num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
    grid += [dict(queries_per_program=qb) for qb in (2, 4)] + [dict(entries_per_step=8)]
    for change in grid:
        try:
            fwd, both = time_selected(t, 64, 4, {**opts, **change})
            print(f"{change} | {fwd:.2f} | {both:.2f}", flush=True)
        except Exception as err:  # a setting the GPU rejects (shared memory, registers)
            print(f"{change} | failed: {type(err).__name__}: {str(err)[:120]}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--per-key-seq", type=int, default=32768)
    parser.add_argument("--tune", type=int, default=0, help="also tune at this T (0: no)")
    parser.add_argument("--num-warps", type=int, help="forward/dQ (default: the kernel's)")
    parser.add_argument("--num-stages", type=int)
    parser.add_argument("--bwd-num-warps", type=int)
    parser.add_argument("--bwd-num-stages", type=int)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("bench_kernels.py needs a GPU (the kernels lower through Triton)")
    opts = dict(num_warps=args.num_warps, num_stages=args.num_stages,
                bwd_num_warps=args.bwd_num_warps, bwd_num_stages=args.bwd_num_stages)
    opts = {name: value for name, value in opts.items() if value is not None}
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, options {opts}")
    checks = [check(64, 4, jnp.bfloat16, False, opts), check(64, 4, jnp.bfloat16, True, opts),
              check(32, 8, jnp.bfloat16, True, opts), check(12, 4, jnp.float32, True, opts)]
    if not all(checks):
        sys.exit("kernel check failed: no timings taken")
    if args.tune:
        tune(args.tune, opts)
    print("\n| shape | T | selected fwd (ms) | cuDNN fwd (ms) | ratio | selected fwd+bwd (ms) "
          "| cuDNN fwd+bwd (ms) | ratio |\n|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        hq, hkv = SHAPES[name]
        for t in args.seq:
            fwd, both = time_selected(t, hq, hkv, opts)
            dense_fwd, dense_both = time_cudnn(t, hq, hkv)
            print(f"| {name} (Hq={hq}, Hkv={hkv}) | {t} | {fwd:.2f} | {dense_fwd:.2f} | "
                  f"{fwd / dense_fwd:.2f} | {both:.2f} | {dense_both:.2f} | "
                  f"{both / dense_both:.2f} |", flush=True)
    t = args.per_key_seq
    print(f"\nper selected (query head, key) pair, T={t}, Hq=64, n=16, l'=64:")
    pairs = t * 64 * 16 * 64
    for hkv in (4, 16):
        fwd, both = time_selected(t, 64, hkv, opts)
        print(f"G={64 // hkv}: fwd {fwd:.2f} ms = {1e9 * fwd / pairs:.3f} ps/pair, fwd+bwd "
              f"{both:.2f} ms = {1e9 * both / pairs:.3f} ps/pair", flush=True)
    print(f"\nT={t}, Hq=64, selection shared by S consecutive queries, S per program:")
    for hkv, shared in ((4, 1), (4, 4), (4, 8), (16, 4)):
        fwd, both = time_selected(t, 64, hkv, {**opts, "queries_per_program": shared},
                                  shared=shared)
        print(f"G={64 // hkv} S={shared}: fwd {fwd:.2f} ms, fwd+bwd {both:.2f} ms", flush=True)
    print(f"transposed-index build (XLA), paper shape, T={t}: {time_index_build(t):.2f} ms")


def time_index_build(t, hkv=4, block=64, n=16):
    """The backward's XLA part: query-tile union and its transpose to key tiles."""
    idx = problem(t, 64, hkv, block=block, n=n)[-1]

    def build(idx):
        pos = positions(1, t)[:, :, None]
        starts = selected_block_starts(idx, pos, jnp.zeros_like(pos), block)
        union = query_tile_union(starts, 1)
        return key_tile_entries(*union, block, -(-t // block), 16, True)

    return median_ms(jax.jit(build), idx)


if __name__ == "__main__":
    main()
