"""Benchmark of the Mosaic GPU range-attention kernels (NSA's compressed and window branches,
pallas_kernels/gpu/mosaic/range_attention.py) against cuDNN, on an H100/H200.

Run from the repo root (one device call; the default sweep, the paper shape, is sized for
about 150 s with --budget-s 120 as its default):
    python -m experiments.bench_range_attention [--quick] [--budget-s 120]
        [--seq 8192 65536] [--shapes paper small-group] [--branches compressed window]
        [--docs 1 4] [--tiling block_kv=64 ...] [--variant block_kv_dq=128 ...]
        [--no-baselines]

Each case (shape, T, branch, documents) runs the kernels in the ops layout, q [B, T, Hq, D] in
and o [B, T, Hq, D], lse [B, T, Hq] out (`range_attention_bthd`: the grouped-rows transposes
included), as nsa_jax.ops will. It is first checked: o, lse,
dq, dk, dv for random cotangents against nsa_jax.ops' xla implementation at T <= 8192, and at
longer T on the rows of the last 256 positions against a float32 dense reference (the same
jitted function, cotangents only on those rows); exits 1 on any mismatch. Then forward and
forward+backward are timed with experiments.timing.device_ms (back-to-back calls, median per
call). Every --variant (Tiling fields over --tiling, comma-separated; "none" for None) is
checked and timed too; by default VARIANTS, backward tiles (the backward is the target
miss) next to the measured default tiling. cuDNN causal and sliding-window attention (no documents)
are timed in the same run. Cases holding an issue-15 target run first; with --budget-s, cases
that would start after that many seconds are skipped and listed, so a run cut short still
reports the targets.

Prints one markdown table (TFLOP/s over visible (query head, key) pairs: 4 * pairs * D forward,
3.5x that forward+backward) and the targets (pass / MISS by x), and writes
$OUT/bench_range_attention.json after every row when OUT is set.
--quick: the two T=8192 target cases of the paper shape and cuDNN's window at 8k, every
variant (under a minute).
--interpret runs the same script at toy sizes on CPU (interpret mode; cuDNN replaced by xla).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from experiments.bench_kernels import SHAPES
from experiments.timing import device_ms
from nsa_jax import NSAConfig, ops
from nsa_jax import layout
from pallas_kernels.gpu.mosaic import common
from pallas_kernels.gpu.mosaic import range_attention as ra

CFG = NSAConfig()  # the paper's l=32, d=16, w=512
# Issue 15, paper shape: (T, branch, documents, "fwd" | "fwd+bwd") -> ms.
TARGETS_MS = {(65536, "compressed", 1, "fwd"): 9.0, (65536, "compressed", 1, "fwd+bwd"): 32.0,
              (65536, "window", 4, "fwd"): 3.3, (65536, "window", 4, "fwd+bwd"): 15.0,
              (8192, "compressed", 1, "fwd"): 0.3, (8192, "window", 4, "fwd"): 0.6}
CHECK_T = 8192  # checked in full against xla; longer sequences on a slice of rows
SLICE_POSITIONS = 256
TOLERANCE = 2e-2  # relative L2
TIMING = {}  # device_ms options (its defaults on a GPU)
# Timed next to the default (the tiling measured on the H200), for the backward miss: 128-key
# dQ steps (half the steps, twice the registers of S and dP), and a 3-deep dQ ring (more loads
# in flight). Both fit the SMEM check; deeper dK/dV rings or 128-row dK/dV steps do not at D=128.
VARIANTS = ["block_kv_dq=128", "stages_dq=3"]


@dataclasses.dataclass
class Problem:
    """One branch's inputs: q, k, v, segment_ids for nsa_jax.ops; kstart, kend for the kernel."""
    branch: str
    docs: int
    q: jax.Array
    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array | None
    kstart: jax.Array
    kend: jax.Array

    @property
    def group(self):
        return self.q.shape[2] // self.k.shape[2]

    @property
    def scale(self):
        return self.q.shape[3] ** -0.5

    def visible_pairs(self):
        """(query head, key) pairs the kernel attends over."""
        return int(jnp.sum(jnp.maximum(self.kend - self.kstart, 0))) * self.q.shape[2]


def packed_segments(key, b, t, docs):
    cuts = jnp.sort(jax.random.randint(key, (b, docs - 1), 1, t), axis=1)
    return jnp.sum(jnp.arange(t)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)


def problem(branch, t, hq, hkv, d, docs, seed=0, dtype=jnp.bfloat16):
    kq, kk, kv, ks = jax.random.split(jax.random.PRNGKey(seed + t + hq), 4)
    segments = packed_segments(ks, 1, t, docs) if docs > 1 else None
    doc_start = layout.document_starts(segments, 1, t)
    if branch == "compressed":
        keys = layout.num_compressed_slots(t, CFG, segments is not None)
        start = layout.compressed_layout(segments, 1, t, CFG).start
        kstart, kend = ra.compressed_ranges(start, doc_start, CFG.compress_block)
    else:
        keys = t
        kstart, kend = ra.window_ranges(doc_start, CFG.window)
    return Problem(branch, docs, jax.random.normal(kq, (1, t, hq, d), dtype),
                   jax.random.normal(kk, (1, keys, hkv, d), dtype),
                   jax.random.normal(kv, (1, keys, hkv, d), dtype), segments, kstart, kend)


def with_grads(fn):
    """fn(q, k, v) -> outputs  ==>  (q, k, v, cotangents) -> (outputs, (dq, dk, dv))."""
    def run(q, k, v, cotangents):
        outputs, pull = jax.vjp(fn, q, k, v)
        return outputs, pull(cotangents)
    return run


def random_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                              for k, x in zip(keys, leaves)])


def rel(x, y):
    """Relative L2 error over finite entries, inf if the pattern of non-finite entries differs."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    finite = jnp.isfinite(y)
    if not bool(jnp.array_equal(jnp.isfinite(x), finite)):
        return float("inf")
    diff = jnp.where(finite, x - y, 0.0)
    return float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(jnp.where(finite, y, 0.0)),
                                                     1e-30))


class Kernel:
    """The timed functions of one (problem, tiling): fwd(q, k, v) -> (o, lse) and
    both(q, k, v, cotangents) -> ((o, lse), (dq, dk, dv)), jitted once, checked and timed."""

    def __init__(self, p: Problem, tiling, interpret):
        self.attention = functools.partial(ra.range_attention_bthd, kstart=p.kstart, kend=p.kend,
                                           scale=p.scale, tiling=tiling, interpret=interpret)
        self.fwd = jax.jit(self.attention)
        self.both = jax.jit(with_grads(self.attention))


def trusted(p: Problem):
    """(q, k, v) -> o (and lse for the compressed branch), nsa_jax.ops' xla implementation."""
    if p.branch == "compressed":
        return lambda q, k, v: ops.compressed_attention(q, k, v, CFG, segment_ids=p.segment_ids,
                                                        implementation="xla")
    return lambda q, k, v: (ops.window_attention(q, k, v, CFG, segment_ids=p.segment_ids,
                                                 implementation="xla"),)


class Checker:
    """Expected values of one problem, computed once and compared with every tiling's kernel
    through the kernel's own jitted forward+backward (no extra compilation per check)."""

    def __init__(self, p: Problem):
        self.p = p
        self.full = p.q.shape[1] <= CHECK_T
        self._want = None

    def names(self):
        if self.full:
            return ("o lse" if self.p.branch == "compressed" else "o") + " dq dk dv"
        return "o lse dq dk dv outside"

    def _expected_full(self):
        """nsa_jax.ops' xla path; the window branch returns no lse, so its cotangent is 0."""
        p = self.p
        cotangents = random_like(jax.random.PRNGKey(7), jax.eval_shape(trusted(p), p.q, p.k,
                                                                       p.v))
        want = jax.jit(with_grads(trusted(p)))(p.q, p.k, p.v, cotangents)
        if p.branch == "window":
            cotangents += (jnp.zeros(p.q.shape[:3], jnp.float32),)
        return cotangents, want

    def _expected_slice(self):
        """Cotangents only on the last SLICE_POSITIONS positions, so dK and dV come from them
        alone and the float32 dense reference needs only the keys [lo, hi) they see."""
        p = self.p
        t, hq, hkv = p.q.shape[1], p.q.shape[2], p.k.shape[2]
        p0 = t - SLICE_POSITIONS
        ks, ke = p.kstart[:, p0:], p.kend[:, p0:]
        lo, hi = int(ks.min()), max(int(ke.max()), int(ks.min()) + 1)
        shapes = (jax.ShapeDtypeStruct(p.q.shape[:3] + (p.v.shape[3],), p.q.dtype),
                  jax.ShapeDtypeStruct(p.q.shape[:3], jnp.float32))
        cotangents = tuple(jnp.zeros_like(c).at[:, p0:].set(c[:, p0:])
                           for c in random_like(jax.random.PRNGKey(7), shapes))
        to_rows = lambda x: ra.to_rows(x[..., None], hkv)[..., 0] if x.ndim == 3 else ra.to_rows(
            x, hkv)
        from_rows = lambda x: ra.from_rows(x, SLICE_POSITIONS, hq)
        reference = lambda q, k, v: ra.reference(q, k, v, ks - lo, ke - lo, group=p.group,
                                                 scale=p.scale)
        (o, lse), (dq, dk, dv) = jax.jit(with_grads(reference))(
            to_rows(p.q[:, p0:]), p.k[:, lo:hi], p.v[:, lo:hi],
            tuple(to_rows(c[:, p0:]) for c in cotangents))
        return cotangents, (p0, lo, hi, (from_rows(o), from_rows(lse), from_rows(dq), dk, dv))

    def errors(self, kernel: Kernel):
        """Relative L2 errors in the order of `names` ("outside": 0.0 if dk and dv are exactly
        0 outside the slice's keys, inf if not)."""
        if self._want is None:
            self._want = self._expected_full() if self.full else self._expected_slice()
        cotangents, want = self._want
        p = self.p
        (o, lse), grads = kernel.both(p.q, p.k, p.v, cotangents)
        if self.full:
            got = ((o, lse) if p.branch == "compressed" else (o,), grads)
            return [rel(x, y) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
        p0, lo, hi, expected = want
        dq, dk, dv = grads
        got = (o[:, p0:], lse[:, p0:], dq[:, p0:], dk[:, lo:hi], dv[:, lo:hi])
        outside = all(bool(jnp.all(jnp.concatenate([x[:, :lo], x[:, hi:]], axis=1) == 0))
                      for x in (dk, dv))
        return [rel(x, y) for x, y in zip(got, expected)] + [0.0 if outside else float("inf")]


def tflops(pairs, d, ms, backward=False):
    """Over visible pairs: 4 * pairs * D for the forward, 2.5 times that more for the backward."""
    return 4 * pairs * d * (3.5 if backward else 1.0) / ms / 1e9


def cudnn(t, hq, hkv, d, window, interpret):
    """(fwd ms, fwd+bwd ms, visible pairs) of cuDNN causal (window None) or sliding-window
    attention without documents (xla when interpreting)."""
    q = jax.random.normal(jax.random.PRNGKey(1), (1, t, hq, d), jnp.bfloat16)
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, t, hkv, d), jnp.bfloat16) for i in (2, 3))
    fn = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                           local_window_size=None if window is None else (window - 1, 0),
                           implementation="xla" if interpret else "cudnn")
    span = t if window is None else window
    pairs = hq * sum(min(i + 1, span) for i in range(t))
    do = random_like(jax.random.PRNGKey(4), q)
    return (device_ms(jax.jit(fn), q, k, v, **TIMING),
            device_ms(jax.jit(with_grads(fn)), q, k, v, do, **TIMING), pairs)


def parse_tiling(spec, base=None):
    """'name=int,name=none,...' -> Tiling (fields over `base`, or the defaults)."""
    fields = {f.name for f in dataclasses.fields(ra.Tiling)}
    kwargs = {}
    for item in filter(None, spec.replace(" ", ",").split(",")):
        name, _, value = item.partition("=")
        if name not in fields or not (value.isdigit() or value == "none"):
            sys.exit(f"tilings take name=int or name=none with name in {sorted(fields)}, "
                     f"got {item!r}")
        kwargs[name] = None if value == "none" else int(value)
    if base is None:
        return ra.Tiling(**kwargs) if kwargs else None
    return dataclasses.replace(base, **kwargs)


def target(shape, t, branch, docs, what):
    return TARGETS_MS.get((t, branch, docs, what)) if shape == "paper" else None


def verdict(ms, goal):
    if goal is None:
        return ""
    return f"{goal} ms: " + ("pass" if ms <= goal else f"MISS by {ms / goal:.2f}x")


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    t: int
    branch: str
    docs: int

    def has_target(self):
        return any(target(self.shape, self.t, self.branch, self.docs, what) is not None
                   for what in ("fwd", "fwd+bwd"))


class Report:
    """The markdown table, printed row by row, and the JSON records (rewritten after each)."""

    HEADER = ("| shape | T | branch | docs | tiling | fwd ms | TFLOP/s | target | "
              "fwd+bwd ms | TFLOP/s | target | dK/dV splits |")

    def __init__(self, meta):
        self.meta, self.records = meta, []
        print("\n" + self.HEADER + "\n" + "|---" * self.HEADER.count(" | ") + "|---|",
              flush=True)

    def add(self, record, row):
        self.records.append(record)
        print(row, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_range_attention.json"), "w") as f:
                json.dump({**self.meta, "records": self.records}, f, indent=1)

    def kernel(self, case, name, p, tiling, fwd_ms, both_ms):
        d = p.q.shape[3]
        pairs = p.visible_pairs()
        goals = [target(case.shape, case.t, case.branch, case.docs, w) for w in ("fwd",
                                                                                   "fwd+bwd")]
        tiling = tiling or ra.Tiling.for_head_dims(d, d)
        rows = -(-p.q.shape[1] * p.group // ra.ROW_ALIGN) * ra.ROW_ALIGN
        splits = tiling.auto_dkv_splits(p.k.shape[1], rows, p.k.shape[2], 1)
        record = dict(**dataclasses.asdict(case), tiling=name, pairs=pairs,
                      fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, dkv_splits=splits,
                      fwd_tflops=tflops(pairs, d, fwd_ms),
                      fwd_bwd_tflops=tflops(pairs, d, both_ms, backward=True))
        self.add(record, f"| {case.shape} | {case.t} | {case.branch} | {case.docs} | {name} | "
                 f"{fwd_ms:.3f} | {record['fwd_tflops']:.0f} | "
                 f"{verdict(fwd_ms, goals[0])} | {both_ms:.3f} | "
                 f"{record['fwd_bwd_tflops']:.0f} | {verdict(both_ms, goals[1])} | {splits} |")

    def baseline(self, shape, t, name, fwd_ms, both_ms, pairs, d):
        record = dict(shape=shape, t=t, branch=name, pairs=pairs, fwd_ms=fwd_ms,
                      fwd_bwd_ms=both_ms)
        self.add(record, f"| {shape} | {t} | {name} | 1 | - | {fwd_ms:.3f} | "
                 f"{tflops(pairs, d, fwd_ms):.0f} | | {both_ms:.3f} | "
                 f"{tflops(pairs, d, both_ms, backward=True):.0f} | | |")


def run_case(case, shapes, d, tilings, interpret, report):
    """Check every tiling on one problem, then time each; False on a mismatch."""
    p = problem(case.branch, case.t, *shapes[case.shape], d, case.docs)
    checker = Checker(p)
    kernels = {name: Kernel(p, tiling, interpret) for name, tiling in tilings.items()}
    for name, kernel in kernels.items():
        errors = checker.errors(kernel)
        ok = all(e < TOLERANCE for e in errors)
        how = "xla" if checker.full else f"reference, last {SLICE_POSITIONS} positions"
        print(f"check {case} {name} vs {how}: rel L2 {checker.names()} = "
              f"{' '.join(f'{e:.1e}' for e in errors)} {'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            return False
    for name, kernel in kernels.items():
        fwd_ms = device_ms(kernel.fwd, p.q, p.k, p.v, **TIMING)
        cotangents = random_like(jax.random.PRNGKey(5), jax.eval_shape(kernel.fwd, p.q, p.k,
                                                                       p.v))
        both_ms = device_ms(kernel.both, p.q, p.k, p.v, cotangents, **TIMING)
        report.kernel(case, name, p, tilings[name], fwd_ms, both_ms)
    return True


def plan(shapes, seqs, branches, docs, baselines):
    """Jobs in order: cases with a target, cuDNN's window and causal on the paper shape, then
    the other cases and baselines."""
    cases = [Case(shape, t, branch, n) for shape in shapes for t in seqs for branch in branches
             for n in docs]
    jobs = [("kernel", c) for c in cases if c.has_target()]
    base = [("cudnn", (shape, t, window)) for shape in shapes for t in seqs
            for window in ((CFG.window, None) if baselines else ())]
    jobs += [j for j in base if j[1][0] == "paper"]
    jobs += [("kernel", c) for c in cases if not c.has_target()]
    return jobs + [j for j in base if j[1][0] != "paper"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--shapes", nargs="+", default=["paper"], choices=list(SHAPES))
    parser.add_argument("--branches", nargs="+", default=["compressed", "window"],
                        choices=["compressed", "window"])
    parser.add_argument("--docs", type=int, nargs="+", default=[1, 4],
                        help="documents per row (1: unpacked)")
    parser.add_argument("--tiling", default="", help="Tiling fields, name=int,...")
    parser.add_argument("--variant", nargs="*", default=VARIANTS,
                        help="more tilings to time, each name=int|none,... over --tiling")
    parser.add_argument("--no-baselines", action="store_true", help="skip cuDNN")
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="start no job after this many seconds")
    parser.add_argument("--quick", action="store_true", help="the T=8192 target cases only")
    parser.add_argument("--interpret", action="store_true", help="toy sizes on CPU")
    args = parser.parse_args()
    shapes, d = {name: SHAPES[name] for name in args.shapes}, 128
    jobs = plan(shapes, args.seq, args.branches, args.docs, not args.no_baselines)
    if args.quick:
        jobs = [("kernel", Case("paper", 8192, "compressed", 1)),
                ("kernel", Case("paper", 8192, "window", 4)),
                ("cudnn", ("paper", 8192, CFG.window))]
    if args.interpret:
        use_toy_sizes()
        shapes, d = {"paper": (16, 2), "small-group": (4, 2)}, 64
        jobs = [(kind, dataclasses.replace(job, t=toy_t(job.t)) if kind == "kernel"
                 else (job[0], toy_t(job[1]), job[2] and CFG.window)) for kind, job in jobs]
    elif jax.default_backend() != "gpu":
        sys.exit("bench_range_attention.py needs a Hopper GPU (or --interpret on CPU)")
    tiling = parse_tiling(args.tiling)
    tilings = {args.tiling or "default": tiling}
    base = tiling or ra.Tiling.for_head_dims(d, d)
    tilings.update({v: parse_tiling(v, base) for v in args.variant})
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, tilings "
          f"{ {k: str(v or 'default') for k, v in tilings.items()} }", flush=True)
    report = Report({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                     "tilings": {k: str(v or "default") for k, v in tilings.items()}})
    start, skipped = time.perf_counter(), []
    with common.abstract_hopper() if args.interpret else contextlib.nullcontext():
        for kind, job in jobs:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                skipped.append(job)
                continue
            if kind == "kernel":
                if not run_case(job, shapes, d, tilings, args.interpret, report):
                    sys.exit("range attention disagrees with the trusted path")
            else:
                shape, t, window = job
                name = "cudnn causal" if window is None else "cudnn window"
                report.baseline(shape, t, name, *cudnn(t, *shapes[shape], d, window,
                                                       args.interpret), d)
    print(f"\n{time.perf_counter() - start:.0f} s; targets (paper shape, ms): "
          + ", ".join(f"T={t} {b} docs={n} {w} <= {ms}" for (t, b, n, w), ms in TARGETS_MS.items()))
    if skipped:
        print(f"skipped (over --budget-s {args.budget_s}): {skipped}")


def use_toy_sizes():
    """--interpret: the SMALL test config, and T cut to sequences a CPU can interpret."""
    global CFG, CHECK_T, SLICE_POSITIONS
    CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                    window=24)
    CHECK_T, SLICE_POSITIONS = 100, 48
    TIMING.update(samples=1, max_reps=1)


def toy_t(t):
    return 96 if t <= 8192 else 160


if __name__ == "__main__":
    main()
