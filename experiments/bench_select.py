"""Block scoring + top-n on the H200 (issue 16): the Mosaic GPU block-score kernel
(pallas_kernels.gpu.mosaic.block_scores) and the Triton top-n (pallas_kernels.gpu.top_n), as the
dispatch table's "select" cell runs them (block_scores.select), paper hyper-parameters
(l=32, d=16, l'=64, n=16), bf16, B=1, D=128.

Run on a GPU, one device call:  python -m experiments.bench_select [--quick] [--budget-s S]
The full run covers T=8192 and 65536 at the paper (Hq=64, Hkv=4) and small-group (32, 8) shapes
and stops starting timings after 100 s (about 2 minutes in all); --quick: the paper shape at
T=8192 only, 30 s of budget (under 45 s in all).
1. Checks first, at every shape; exit 1 before any timing if one fails:
   - the Mosaic scores against the xla path's (ops.block_scores(..., implementation="xla")):
     relative error < 1e-4, all finite;
   - the selection from the Mosaic scores (lax.top_k on the rank keys) against
     ops.select_blocks of the xla scores: rows whose sets differ must be provable near-ties (the
     blocks only one side chose score within TIE_TOLERANCE, relative to the row's largest score,
     of each other in both score arrays);
   - the Triton top-n, both schemes, and block_scores.select in two query chunks must pick
     exactly the blocks of lax.top_k on the whole sequence's Mosaic scores.
2. Timings (experiments.timing.device_ms: back-to-back calls, one block), most important first;
   once `--budget-s` seconds have passed, the remaining items are skipped and listed:
   a. per shape, the production path: the scores (default tiling), the top-n (default scheme,
      causal widths) and `select`, the two together, with the issue-16 targets;
   b. at T=65536, then 8192: the score kernel's schedules (Tiling.schedule; each checked
      against the default's scores) and the top-n variants (each checked against lax.top_k);
   c. the old fused Triton kernel (pallas_kernels.gpu.triton.select_blocks) and the top-n by
      lax.top_k;
   d. peak memory (XLA's compiled estimate) of `select` at 64k, whole sequence vs 8192-query
      chunks.
   TFLOP/s: of the recomputed Q·K_cmpᵀ, 2 * visible (position, head, slot) pairs * D / time.
With $OUT set, results go to $OUT/bench_select.json (rewritten after every section).
--smoke: the script's CPU self-test: a tiny shape, every kernel in interpret mode, one non-default
schedule (timings meaningless).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import device_ms
from nsa_jax import NSAConfig, layout, ops
from nsa_jax.selection_rule import chosen_blocks, rank_keys, select_top_n
from pallas_kernels.gpu import top_n
from pallas_kernels.gpu.mosaic import block_scores as mosaic

CFG = NSAConfig()
SHAPES = {"paper": (64, 4), "small-group": (32, 8)}  # (Hq, Hkv)
LENGTHS = (8192, 65536)
TARGET_MS = {8192: 0.5, 65536: 6.0}
SMALL_GROUP_FACTOR = 1.5
TIE_TOLERANCE = 1e-5  # two float32 computations of one score differ by ~1e-6 relative
SCORE_VARIANTS = {  # label -> Tiling.for_shape keywords; the first is the default
    "free (default)": {},
    "alternate": dict(schedule="alternate"),
    "pipeline": dict(schedule="pipeline"),
    "pipeline, 64 slots": dict(schedule="pipeline", slots=64),
    "ping_pong (old)": dict(schedule="ping_pong"),
}
TOP_N_VARIANTS = {  # label -> triton_top_n keywords; the first is the default
    "groups (default)": {},
    "groups, 16384 elements x 8 warps": dict(block_elems=16384, num_warps=8),
    "rounds": dict(scheme="rounds"),
    "rounds, whole rows (old kernel)": dict(scheme="rounds", causal=False),
}
INTERPRET = False  # --smoke
TIMING = dict(samples=5, min_sample_ms=25.0)
START = time.monotonic()
RESULTS = dict(checks=[], timings=[], targets=[], skipped=[])


def device():
    """Interpret mode (--smoke) needs the abstract Hopper device around tracing and running."""
    return mosaic.common.abstract_hopper() if INTERPRET else contextlib.nullcontext()


def problem(t, hq, hkv, d=128, seed=0):
    """q, k_cmp, lse (the compressed branch's), slot starts, document starts, local positions."""
    keys = jax.random.split(jax.random.PRNGKey(seed + t + hq), 3)
    q = jax.random.normal(keys[0], (1, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, hkv, d), jnp.bfloat16)
    k_cmp, v_cmp = ops.compress(k, CFG), ops.compress(v, CFG)
    impl = "xla" if INTERPRET else None
    _, lse = jax.jit(lambda *a: ops.compressed_attention(*a, CFG, implementation=impl))(
        q, k_cmp, v_cmp)
    start = layout.compressed_layout(None, 1, t, CFG).start
    doc = layout.document_starts(None, 1, t)
    return q, k_cmp, lse, start, doc, jnp.arange(t)[None, :] - doc


def tiling_of(q, hkv, **kwargs):
    return mosaic.Tiling.for_shape(CFG, q.shape[-1], q.shape[2] // hkv, q.dtype, **kwargs)


@functools.partial(jax.jit, static_argnames=("tiling",))
def scores_fn(q, k_cmp, lse, start, doc, tiling=None):
    """Mosaic block scores [B, Hkv, T, NB] of the whole sequence."""
    return mosaic.block_scores(q, k_cmp, lse, start, doc, CFG, tiling=tiling,
                               interpret=INTERPRET)


@functools.partial(jax.jit, static_argnames=("scheme", "causal", "block_elems", "num_warps"))
def triton_top_n(scores, local, scheme="groups", causal=True, block_elems=8192, num_warps=4):
    """The Triton top-n of scores [B, H, T, NB] for queries at document-relative positions
    local [B, T] (rank keys in the kernel; causal: rows read to their visible width):
    [B, H, T, n] as chosen_blocks gives them."""
    b, h, c, nb = scores.shape
    pos = jnp.broadcast_to(local[:, None, :], (b, h, c)).reshape(b * h, c)
    width_of = (lambda end: (end - 1) // CFG.select_block + 1) if causal else None
    keys, ids = top_n.top_n(scores.reshape(b * h, c, nb), pos, CFG.num_selected,
                            lambda s, p, col: rank_keys(s, p, CFG, blocks=col),
                            width_of=width_of, scheme=scheme, block_elems=block_elems,
                            num_warps=num_warps, interpret=INTERPRET)
    return chosen_blocks(keys, ids).reshape(b, h, c, -1)


@jax.jit
def lax_top_n(scores, local):
    """lax.top_k on the rank keys: [B, H, T, n]."""
    return select_top_n(scores, local[:, None, :], CFG)


@functools.partial(jax.jit, static_argnames=("tiling", "chunk"))
def select_fn(q, k_cmp, lse, tiling=None, chunk=None):
    """The dispatch table's "select" on Hopper: [B, T, Hkv, n]."""
    return mosaic.select(q, k_cmp, lse, CFG, tiling=tiling, chunk=chunk, interpret=INTERPRET)


def visible_pairs(t, hq):
    local = np.arange(t)
    visible = np.maximum((local - CFG.compress_block + 1) // CFG.compress_stride + 1, 0)
    return float(hq) * float(visible.sum())


def near_tie(scores_row, mine, theirs):
    """Blocks chosen by one side only score within TIE_TOLERANCE of each other."""
    only_mine, only_theirs = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if len(only_mine) != len(only_theirs) or -1 in only_mine or -1 in only_theirs:
        return False
    top = float(np.max(scores_row))
    a, b = scores_row[only_mine], scores_row[only_theirs]
    return float(max(np.max(a) - np.min(b), np.max(b) - np.min(a))) <= TIE_TOLERANCE * top


def check(t, hq, hkv):
    """(ok, report dict) for one shape."""
    q, k_cmp, lse, start, doc, local = problem(t, hq, hkv)
    theirs = jax.jit(lambda *a: ops.block_scores(*a, CFG, implementation="xla"))(q, k_cmp, lse)
    xla_idx = jax.jit(lambda s: ops.select_blocks(s, CFG, implementation="xla"))(theirs)
    ours = scores_fn(q, k_cmp, lse, start, doc).transpose(0, 2, 1, 3)  # [B, T, H, NB]
    finite = bool(jnp.isfinite(ours).all())
    err = float(jnp.max(jnp.abs(ours - theirs)) / jnp.max(jnp.abs(theirs)))
    want = lax_top_n(ours.transpose(0, 2, 1, 3), local)  # [B, H, T, n]
    same = {f"triton {s}": bool(jnp.array_equal(triton_top_n(ours.transpose(0, 2, 1, 3),
                                                                local, scheme=s), want))
            for s in top_n.SCHEMES}
    chunked = select_fn(q, k_cmp, lse, chunk=max(64, t // 2))
    same["select, two chunks"] = bool(jnp.array_equal(chunked.transpose(0, 2, 1, 3), want))
    want = want.transpose(0, 2, 1, 3)
    a, b = jnp.sort(want, -1), jnp.sort(xla_idx, -1)
    rows = np.argwhere(np.asarray(jnp.any(a != b, axis=-1)))
    idx = tuple(jnp.asarray(rows[:, i]) for i in range(3))
    a, b = np.asarray(a[idx]), np.asarray(b[idx])
    mine, other = np.asarray(ours[idx]), np.asarray(theirs[idx])
    ties = sum(near_tie(other[i], a[i], b[i]) and near_tie(mine[i], a[i], b[i])
               for i in range(len(rows)))
    ok = finite and err < 1e-4 and ties == len(rows) and all(same.values())
    report = dict(T=t, Hq=hq, Hkv=hkv, scores_rel_err=err, rows=int(want.shape[1] * hkv),
                  differing_rows=len(rows), near_ties=ties, finite=finite, identical=same,
                  ok=ok)
    print(f"check T={t} Hq={hq} Hkv={hkv}: scores rel err {err:.1e}, rows differing from xla "
          f"{len(rows)} of {report['rows']} (near-ties {ties}); identical to lax.top_k on the "
          f"whole sequence: {same} {'ok' if ok else 'FAIL'}", flush=True)
    return ok, report


def over_budget(args, what):
    if time.monotonic() - START <= args.budget_s:
        return False
    RESULTS["skipped"].append(what)
    print(f"  skipped (past the {args.budget_s:g} s budget): {what}", flush=True)
    return True


def timed(name, t, impl, fn, *fargs, flops=None, same=None):
    """One table row: device time of fn(*fargs), TFLOP/s if flops, `same` (a check's result)."""
    try:
        ms = device_ms(fn, *fargs, **TIMING)
    except Exception as e:  # a failing candidate is reported, not fatal
        print(f"| {name} | {t} | {impl} | FAILED {type(e).__name__}: {str(e)[:300]} |",
              flush=True)
        return None
    tflops = None if flops is None else flops / ms * 1e-9
    row = dict(shape=name, T=t, impl=impl, ms=ms, tflops=tflops, same=same)
    RESULTS["timings"].append(row)
    print(f"| {name} | {t} | {impl} | {ms:.3f} | {'' if tflops is None else f'{tflops:.0f}'} "
          f"| {'' if same is None else same} |", flush=True)
    return row


def main_path(name, t, hq, hkv):
    """Section a: the production scores, top-n and select."""
    q, k_cmp, lse, start, doc, local = problem(t, hq, hkv)
    flops = 2 * visible_pairs(t, hq) * q.shape[-1]
    timed(name, t, "scores", scores_fn, q, k_cmp, lse, start, doc, flops=flops)
    scores = scores_fn(q, k_cmp, lse, start, doc)
    timed(name, t, "top-n", triton_top_n, scores, local)
    timed(name, t, "select = scores + top-n", select_fn, q, k_cmp, lse, flops=flops)


def variants(name, t, hq, hkv, args):
    """Section b: score schedules and top-n variants, each checked against the default."""
    q, k_cmp, lse, start, doc, local = problem(t, hq, hkv)
    flops = 2 * visible_pairs(t, hq) * q.shape[-1]
    default = scores_fn(q, k_cmp, lse, start, doc)
    scale = jnp.max(jnp.abs(default))
    for label, kwargs in list(SCORE_VARIANTS.items())[1:]:
        if over_budget(args, f"{name} T={t} scores {label}"):
            return
        tiling = tiling_of(q, hkv, **kwargs)
        try:
            diff = float(jnp.max(jnp.abs(scores_fn(q, k_cmp, lse, start, doc, tiling)
                                         - default)) / scale)
        except Exception as e:
            print(f"| {name} | {t} | scores {label} | FAILED {type(e).__name__}: "
                  f"{str(e)[:300]} |", flush=True)
            continue
        timed(name, t, f"scores {label}", scores_fn, q, k_cmp, lse, start, doc, tiling,
              flops=flops, same=f"max rel diff {diff:.1e}")
    want = lax_top_n(default, local)
    for label, kwargs in list(TOP_N_VARIANTS.items())[1:]:
        if over_budget(args, f"{name} T={t} top-n {label}"):
            return
        fn = functools.partial(triton_top_n, **kwargs)
        try:
            same = bool(jnp.array_equal(fn(default, local), want))
        except Exception as e:
            print(f"| {name} | {t} | top-n {label} | FAILED {type(e).__name__}: "
                  f"{str(e)[:300]} |", flush=True)
            continue
        timed(name, t, f"top-n {label}", fn, default, local, same=same)


def others(name, t, hq, hkv, args):
    """Section c: the old fused Triton kernel and lax.top_k."""
    from pallas_kernels.gpu.triton.select_blocks import select_blocks as fused

    q, k_cmp, lse, start, doc, local = problem(t, hq, hkv)
    flops = 2 * visible_pairs(t, hq) * q.shape[-1]
    if not over_budget(args, f"{name} T={t} triton fused"):
        timed(name, t, "triton fused (old path)",
              jax.jit(lambda *a: fused(*a, CFG, interpret=INTERPRET)), q, k_cmp, lse,
              flops=flops)
    if not over_budget(args, f"{name} T={t} lax.top_k"):
        timed(name, t, "top-n: rank keys + lax.top_k", lax_top_n,
              scores_fn(q, k_cmp, lse, start, doc), local)


def peak_memory(name, t, hq, hkv, args):
    """Section d: XLA's peak estimate of select, whole sequence vs 8192-query chunks."""
    q, k_cmp, lse, _, _, _ = problem(t, hq, hkv)
    for chunk in (t, min(8192, max(64, t // 2))):
        if over_budget(args, f"{name} T={t} peak memory, chunk {chunk}"):
            return
        stats = select_fn.lower(q, k_cmp, lse, chunk=chunk).compile().memory_analysis()
        peak = None if stats is None else stats.temp_size_in_bytes + stats.output_size_in_bytes
        label = "whole sequence" if chunk == t else f"{chunk}-query chunks"
        print(f"  peak memory of select at {name} T={t}, {label}: "
              f"{'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}", flush=True)
        RESULTS["timings"].append(dict(shape=name, T=t, impl=f"peak bytes ({label})",
                                       bytes=peak))


def verdict():
    """(text, met) per (shape, T) of the production `select`."""
    lines = []
    for r in RESULTS["timings"]:
        if r.get("impl") != "select = scores + top-n" or r["T"] not in TARGET_MS:
            continue
        target = TARGET_MS[r["T"]] * (1 if r["shape"] == "paper" else SMALL_GROUP_FACTOR)
        lines.append((f"{r['shape']} T={r['T']}: {r['ms']:.3f} ms vs target {target:g} ms",
                      r["ms"] <= target))
    return lines


def save():
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_select.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


def main():
    global INTERPRET, LENGTHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="paper shape at T=8192 only")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no timing after this many seconds (default: 100, --quick "
                             "30, --smoke no limit)")
    parser.add_argument("--smoke", action="store_true", help="CPU self-test, interpret mode")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}", flush=True)
    cases = [(s, t) for t in LENGTHS for s in SHAPES]
    if args.quick:
        cases = [("paper", 8192)]
    if args.budget_s is None:
        args.budget_s = float("inf") if args.smoke else 30.0 if args.quick else 100.0
    if args.smoke:
        INTERPRET, cases = True, [("smoke", 384)]
        SHAPES["smoke"] = (4, 2)
        LENGTHS = (384,)
        TIMING.update(samples=1, min_sample_ms=0.0)
        for label in list(SCORE_VARIANTS)[2:]:  # one non-default schedule covers the code path
            del SCORE_VARIANTS[label]
    ok = True
    with device():
        for shape, t in cases:
            good, report = check(t, *SHAPES[shape])
            RESULTS["checks"].append(dict(shape=shape, **report))
            ok &= good
        save()
        if not ok:
            print("correctness check FAILED: no timing", file=sys.stderr)
            sys.exit(1)
        print("| shape | T | implementation | ms | Q·K_cmp TFLOP/s | same as default |\n"
              "|---|---|---|---|---|---|", flush=True)
        for shape, t in cases:
            if not over_budget(args, f"{shape} T={t} production path"):
                main_path(shape, t, *SHAPES[shape])
        save()
        RESULTS["targets"] = [dict(text=text, met=met) for text, met in verdict()]
        for text, met in verdict():
            print(f"target {text}: {'PASS' if met else 'MISS'}", flush=True)
        longest = max(t for _, t in cases)
        for shape, t in sorted(cases, key=lambda c: -c[1]):
            variants(shape, t, *SHAPES[shape], args)
            save()
        for shape, t in sorted(cases, key=lambda c: -c[1]):
            others(shape, t, *SHAPES[shape], args)
            save()
        for shape, t in cases:
            if t == longest:
                peak_memory(shape, t, *SHAPES[shape], args)
        save()
    print(f"done in {time.monotonic() - START:.0f} s; skipped: {len(RESULTS['skipped'])}",
          flush=True)


if __name__ == "__main__":
    main()
