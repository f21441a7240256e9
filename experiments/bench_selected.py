"""Selected-block attention on Hopper: the Mosaic GPU kernels (block-outer) against the Triton
kernel (query-outer), at the paper shape and at smaller GQA groups (issue 17).

Run on an H100/H200 from the repository root (OUT is optional; logs and JSON go there):
    OUT=runs/bench_selected python experiments/bench_selected.py            # T=65,536, ~10 min
    OUT=runs/bench_selected python experiments/bench_selected.py --quick    # < 2 min smoke test

1. Correctness first (exit 1 on any failure, before timing): o, dq, dk, dv of
   `pallas_kernels.gpu.mosaic.selected_attention` against `nsa_jax.ops.selected_attention(...,
   implementation="xla")` (relative L2 error < 2e-2 in bf16) at T=1024 for G=16, 4, 3 and 1, with
   packed documents, -1 slots, repeated and out-of-range ids, and with every --tilings setting.
2. Timing (experiments.timing.device_ms: median of --iters samples after --warmup calls; the
   index build is inside every call) at B=1, D=128, l'=64, n=16, bf16 for G=16 (Hq=64, Hkv=4),
   G=4 (Hq=64, Hkv=16) and G=1 (Hq=Hkv=16), with random causal selections (block 0 and the
   current block forced, the worst case for sharing) and, for G=16, with selections from a real
   forward pass (`ops.nsa_attention(..., return_aux=True)` on smooth, self-similar q/k:
   neighbouring queries overlap). Each row: forward and forward+backward ms, effective TFLOP/s
   (4*T*Hq*n*l'*D forward, 3.5x that for both), the modelled bytes per selected (position,
   KV head, key) triple, the time per selected (query head, key) pair relative to the G=16
   Mosaic forward/both, and the Triton kernel (`pallas_kernels.gpu.triton.selected_attention`)
   in the same run.
3. Targets (issue 17, T=65,536, random): paper shape forward <= 8 ms and forward+backward <= 28 ms;
   G=4 per-pair time within 1.5x of G=16; G=1 within 2.5x. Printed as met / missed.
--quick: the checks for every G (16, 4, 3, 1; the crash-prone part, so first), then only the
paper shape (G=16) at T=65,536 with random selections, the first --tilings setting and Triton.
--interpret runs the whole script in Mosaic GPU / Triton interpret mode at tiny sizes on a CPU, to
check the script itself (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.timing import device_ms  # noqa: E402
from nsa_jax import NSAConfig, ops  # noqa: E402
from nsa_jax.layout import document_starts  # noqa: E402
from pallas_kernels.gpu.mosaic import common  # noqa: E402
from pallas_kernels.gpu.mosaic import selected_attention as mosaic  # noqa: E402

D, BLOCK, N = 128, 64, 16
GROUPS = {16: (64, 4), 4: (64, 16), 1: (16, 16)}  # G: (Hq, Hkv)
TINY_GROUPS = {16: (16, 1), 4: (8, 2), 1: (2, 2)}  # --interpret
CFG = NSAConfig(select_block=BLOCK, num_selected=N)


class Log:
    """print, and append to OUT/bench_selected.log when OUT is set."""

    def __init__(self, out):
        self.file = None
        if out:
            pathlib.Path(out).mkdir(parents=True, exist_ok=True)
            self.file = open(pathlib.Path(out) / "bench_selected.log", "a")

    def __call__(self, line=""):
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def triton_kernel():
    """The query-outer Triton kernel (the fallback before Hopper), ops signature."""
    from pallas_kernels.gpu.triton.selected_attention import selected_attention
    return selected_attention


def random_indices(key, b, t, hkv, doc_start, empty=0.0):
    """Distinct causal block ids, block 0 and the query's own block forced, -1 padded; with
    `empty` > 0 some rows get a repeated id, an out-of-range id, or nothing at all."""
    own = (jnp.arange(t)[None] - doc_start) // BLOCK  # [B, T]
    nb = -(-t // BLOCK)
    blocks = jnp.arange(max(nb, N))  # ids >= nb lie after every query: never chosen
    score = jax.random.uniform(key, (b, t, hkv, blocks.shape[0]))
    score = jnp.where(blocks > own[..., None, None], -1.0, score)
    score = jnp.where((blocks == own[..., None, None]) | (blocks == 0), 2.0, score)
    value, idx = jax.lax.top_k(score, N)
    idx = jnp.where(value >= 0, idx, -1).astype(jnp.int32)
    if empty:
        draw = jax.random.uniform(jax.random.fold_in(key, 1), (b, t, hkv, 1))
        idx = jnp.where(draw < empty, -1, idx)
        idx = idx.at[..., -1].set(jnp.where(draw[..., 0] < 2 * empty, idx[..., 0], idx[..., -1]))
        idx = idx.at[..., -2].set(jnp.where(draw[..., 0] > 1 - empty, nb + 5, idx[..., -2]))
    return idx


def smooth_qkv(key, t, hq, hkv, d):
    """q, k, v whose keys drift slowly along T and whose queries resemble their own keys: the
    compressed scores then favour nearby blocks, as in a trained model."""
    ks = jax.random.split(key, 4)
    walk = jnp.cumsum(jax.random.normal(ks[0], (1, t, hkv, d)), axis=1)
    walk = walk / jnp.sqrt(jnp.arange(1, t + 1))[None, :, None, None]
    k = walk + 0.3 * jax.random.normal(ks[1], walk.shape)
    q = jnp.repeat(walk, hq // hkv, axis=2) + 0.3 * jax.random.normal(ks[2], (1, t, hq, d))
    v = jax.random.normal(ks[3], (1, t, hkv, d))
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


def real_indices(q, k, v):
    gates = jnp.ones(q.shape[:3] + (3,), q.dtype)
    _, aux = jax.jit(lambda q, k, v: ops.nsa_attention(q, k, v, gates, CFG, return_aux=True))(
        q, k, v)
    return aux["indices"]


def value_and_grads(f, q, k, v, do):
    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(do.astype(o.dtype)))


def check(log, hq, hkv, tiling, packed, t=1024, d=D, interpret=False):
    """Relative L2 errors of o, dq, dk, dv against the xla implementation; True if all pass."""
    b = 2
    ks = jax.random.split(jax.random.PRNGKey(hq * 131 + hkv), 6)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, hkv, 96), jnp.bfloat16)  # Dv != Dk
    do = jax.random.normal(ks[3], (b, t, hq, 96), jnp.float32)
    segment_ids = None
    if packed:  # documents of 300, 421 and 303 tokens: blocks fall off the 64-key tile grid
        sizes = jnp.asarray([300, 421, 303]) * t // 1024
        segment_ids = jnp.repeat(jnp.arange(3), sizes, total_repeat_length=t)[None].repeat(b, 0)
    doc_start = document_starts(segment_ids, b, t)
    idx = random_indices(ks[4], b, t, hkv, doc_start, empty=0.05)

    @jax.jit
    def got(q, k, v, do, idx, doc_start):
        f = lambda q, k, v: mosaic.selected_attention(
            q, k, v, idx, CFG, doc_start=doc_start if packed else None, tiling=tiling,
            interpret=interpret)
        return value_and_grads(f, q, k, v, do)

    @jax.jit
    def want(q, k, v, do, idx, segment_ids):
        f = lambda q, k, v: ops.selected_attention(q, k, v, idx, CFG, segment_ids=segment_ids,
                                                   implementation="xla")
        return value_and_grads(f, q, k, v, do)

    f32 = lambda x: x.astype(jnp.float32)
    errs = [float(jnp.linalg.norm(f32(x) - f32(y)) / jnp.linalg.norm(f32(y)))
            for x, y in zip(got(q, k, v, do, idx, doc_start), want(q, k, v, do, idx, segment_ids))]
    ok = all(e < 2e-2 for e in errs)
    log(f"check G={hq // hkv} Hq={hq} Hkv={hkv} packed={packed} {tiling}: rel L2 o/dq/dk/dv = "
        f"{' '.join(f'{e:.1e}' for e in errs)} {'ok' if ok else 'FAIL'}")
    return ok


def parse_tiling(name):
    """'wgs2', 'wgs1-split', ... -> mosaic.Tiling."""
    wgs, _, split = name.partition("-")
    if not wgs.startswith("wgs") or split not in ("", "split"):
        raise SystemExit(f"--tilings: expected wgsN or wgsN-split, got {name!r}")
    return mosaic.Tiling(compute_wgs=int(wgs[3:]), fused_backward=not split)


def time_kernel(kernel, q, k, v, idx, iters, warmup):
    do = jnp.ones(q.shape[:3] + (v.shape[3],), q.dtype)
    fwd = jax.jit(lambda q, k, v, idx: kernel(q, k, v, idx, CFG))
    both = jax.jit(lambda q, k, v, idx, do: value_and_grads(
        lambda *x: kernel(*x, idx, CFG), q, k, v, do))
    return (device_ms(fwd, q, k, v, idx, samples=iters, warmup=warmup),
            device_ms(both, q, k, v, idx, do, samples=iters, warmup=warmup))


def modelled_bytes_per_key(impl, g):
    """Bytes moved per selected (position, KV head, key) triple in the forward, as the module
    docstrings model them: query-outer loads K and V per key; block-outer loads a K/V tile per
    item of 128 query-head rows and moves each row's query, partial output (written and read
    back by the merge) once per 64-key tile."""
    kv = 2 * D * 2
    if impl == "triton":
        return kv
    rows = 64 * 2
    positions = max(1, rows // g)
    return kv / positions + 3 * g * D * 2 / BLOCK


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="checks for every G, then only the paper shape, random selections")
    parser.add_argument("--seq", type=int, default=None, help="T (default 65536)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tilings", nargs="+", default=["wgs2", "wgs1", "wgs2-split"],
                        help="Mosaic settings to time, the first is the headline: wgsN = "
                             "Tiling(compute_wgs=N); -split = separate dQ and dK/dV kernels")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--interpret", action="store_true", help="CPU self-test of the script")
    args = parser.parse_args()
    if not args.interpret:
        return bench(args)
    # Simulated GPU threads wait on each other: run each inline (see the kernel tests); the
    # interpreter needs an (abstract) Hopper to run on.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    with common.abstract_hopper():
        bench(args)


def bench(args):
    """Checks (exit 1 on a failure), then the timing table and the targets."""
    out = os.environ.get("OUT")
    log = Log(out)
    t = args.seq or (256 if args.interpret else 65536)
    check_t, d = (128, 64) if args.interpret else (1024, D)
    groups = TINY_GROUPS if args.interpret else GROUPS
    if args.quick:
        groups = {16: groups[16]}
    log(f"# bench_selected {time.strftime('%Y-%m-%d %H:%M')} {jax.devices()[0].device_kind} "
        f"jax {jax.__version__} T={t}")
    names = args.tilings[:1] if args.quick else args.tilings
    tilings = [parse_tiling(name) for name in names]

    heads = [(2, 2), (4, 1)] if args.interpret else [(64, 4), (64, 16), (24, 8), (16, 16)]
    checks = [(hq, hkv, tl, packed) for hq, hkv in heads for tl in tilings
              for packed in (False, True)]
    if args.quick or args.interpret:  # the first tiling; packed for every G, plain for Hq=64
        checks = [c for c in checks if c[2] == tilings[0] and (c[3] or c[0] == heads[0][0])]
    results = dict(device=jax.devices()[0].device_kind, seq=t, checks=[], rows=[])
    ok = True
    for c in checks:
        passed = check(log, *c, t=check_t, d=d, interpret=args.interpret)
        ok &= passed
        results["checks"].append(dict(hq=c[0], hkv=c[1], tiling=dataclasses.asdict(c[2]),
                                      packed=c[3], ok=passed))
    if not ok:
        log("correctness check FAILED: no timing")
        write_json(out, results)
        sys.exit(1)

    triton = None if args.no_triton else triton_kernel()
    log("\n| G | Hq | Hkv | selection | kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | "
        "fwd+bwd TFLOP/s | bytes/key | per-pair fwd vs G=16 | per-pair both vs G=16 |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for g, (hq, hkv) in groups.items():
        key = jax.random.PRNGKey(g)
        ks = jax.random.split(key, 3)
        q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, t, hkv, d), jnp.bfloat16)
        selections = [("random", (q, k, v, random_indices(key, 1, t, hkv, jnp.zeros((1, t),
                                                                                     jnp.int32))))]
        if g == 16 and not args.quick:
            sq, sk, sv = smooth_qkv(key, t, hq, hkv, d)
            selections.append(("real", (sq, sk, sv, real_indices(sq, sk, sv))))
        for selection, (q, k, v, idx) in selections:
            kernels = [(f"mosaic {name}", functools.partial(
                mosaic.selected_attention, tiling=tl, interpret=args.interpret))
                for name, tl in zip(names, tilings)]
            if triton is not None:
                kernels.append(("triton", functools.partial(triton, interpret=args.interpret)))
            for name, kernel in kernels:
                try:
                    fwd, both = time_kernel(kernel, q, k, v, idx, args.iters, args.warmup)
                except Exception as err:  # a setting the GPU rejects (SMEM, registers)
                    log(f"| {g} | {hq} | {hkv} | {selection} | {name} | failed: "
                        f"{type(err).__name__}: {str(err)[:160]} |")
                    continue
                row = report(log, g, hq, hkv, selection, name, fwd, both, t, d, base)
                results["rows"].append(row)
    targets(log, results["rows"], t)
    write_json(out, results)


def report(log, g, hq, hkv, selection, name, fwd, both, t, d, base):
    flop = 4 * t * hq * N * BLOCK * d
    pairs = t * hq * N * BLOCK
    if g == 16 and selection == "random":
        base.setdefault(name, (fwd / pairs, both / pairs))
    ref = base.get(name, (float("nan"),) * 2)
    rel = (fwd / pairs / ref[0], both / pairs / ref[1])
    bytes_key = modelled_bytes_per_key("triton" if name == "triton" else "mosaic", g)
    log(f"| {g} | {hq} | {hkv} | {selection} | {name} | {fwd:.2f} | {both:.2f} | "
        f"{flop / fwd / 1e9:.0f} | {3.5 * flop / both / 1e9:.0f} | {bytes_key:.0f} | "
        f"{rel[0]:.2f} | {rel[1]:.2f} |")
    return dict(g=g, hq=hq, hkv=hkv, selection=selection, kernel=name, fwd_ms=fwd, both_ms=both,
                fwd_tflops=flop / fwd / 1e9, both_tflops=3.5 * flop / both / 1e9,
                bytes_per_key=bytes_key, per_pair_fwd_vs_g16=rel[0], per_pair_both_vs_g16=rel[1])


def targets(log, rows, t):
    """Issue 17's targets for each Mosaic setting, random selections."""
    random = [r for r in rows if r["kernel"].startswith("mosaic") and r["selection"] == "random"]
    for kernel in dict.fromkeys(r["kernel"] for r in random):
        by_g = {r["g"]: r for r in random if r["kernel"] == kernel}
        checks = []
        if 16 in by_g:
            checks += [("paper fwd <= 8 ms", by_g[16]["fwd_ms"], 8.0),
                       ("paper fwd+bwd <= 28 ms", by_g[16]["both_ms"], 28.0)]
        for g, limit in ((4, 1.5), (1, 2.5)):
            if g in by_g:
                checks += [(f"G={g} per pair fwd <= {limit}x G=16",
                            by_g[g]["per_pair_fwd_vs_g16"], limit),
                           (f"G={g} per pair fwd+bwd <= {limit}x G=16",
                            by_g[g]["per_pair_both_vs_g16"], limit)]
        log(f"\ntargets, {kernel}, random selections, T={t} (stated for T=65536): " + "; ".join(
            f"{name}: {value:.2f} {'met' if value <= limit else 'missed'}"
            for name, value, limit in checks))


def write_json(out, results):
    if out:
        path = pathlib.Path(out) / "bench_selected.json"
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
