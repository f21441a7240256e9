"""The whole NSA op at long context on one GPU, checked row by row against a slice-based reference:
evidence that no index in any kernel overflows int32 (issue 20 item 2; at the paper's shape q's
flat offsets pass 2**31 at T = 262,144).

    python -m experiments.long_context_check            # one H200: 512k fwd+bwd, 1M fwd
    python -m experiments.long_context_check --smoke    # the same on the CPU at tiny T (CI)

Run from the repository root. Two stages, each in its own subprocess (a clean peak-memory count,
and an out-of-memory or crash in one is reported without losing the other):
  backward  ops.nsa_attention(q, k, v, gates, NSAConfig()) and its gradient at T = --length
  forward   the op alone at T = --forward-length
on B=1, Hq=64, Hkv=4, D=128 (the paper's shape, l=32, d=16, l'=64, n=16, w=512), bf16, with
implementation=None (the backend's kernels). The loss weights three slices of `--rows` rows: the
first rows, the rows around T/2 (where q's flat offset crosses 2**31 at T = 524,288) and the last.
The reference is xla decoding (ops.nsa_decode_attention, implementation="xla"): one query at a
time over caches holding the whole sequence, O(rows * T) however long T is; row t of decoding is
row t of the parallel op. Checks, in this order, before any timing: the selected blocks agree
(near-ties may flip a few), outputs (and dq, dgates) agree on the rows whose selection agrees,
dk and dv agree, every output is finite and dq is exactly 0 outside the slices (a wrapped offset
would write somewhere). Then the median time and the peak device memory of the op.

Progress: the plan first (stages, sizes, each stage's share of --budget-s), then a start and an
end line, stamped with seconds, for every part of a stage (inputs, the op's first call, the
reference of each slice, timing), streamed from the stage's process as it prints them
(experiments/streaming.py; its lines prefixed with the stage's name). --budget-s (default 540, for
a 600 s call: run it under `timeout` of at least --budget-s + 60) covers both stages: each gets
what is left over the stages still to run, and one still running at its limit is stopped and
reported as FAIL (stopped). Time on an H200 is unmeasured (the 2026-11-30 calls of 95 and 150 s
ended with nothing printed, the output having been held back until the end): each stage starts a
Python, draws 8 GiB (backward) or 16 GiB (forward) of q, compiles the op (and its gradient), then
the reference, so a stage's first minute or two is mostly compilation.
Prints a table; with $OUT set, writes $OUT/long_context_check.json after each stage and each
stage's log line by line. Exit status 1 when a stage fails, crashes or is stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_kernels import median_ms
from experiments.streaming import Stages, run_streamed
from nsa_jax import NSAConfig, ops

CFG = NSAConfig()
TOLERANCE = 3e-2  # bf16 inputs; both sides accumulate in float32
MAX_FLIPPED = 0.01  # fraction of (row, KV head) selections a near-tie may flip
SMOKE = {"length": 384, "forward_length": 512, "rows": 8, "q_heads": 4, "kv_heads": 2,
         "head_dim": 16, "repeats": 1}
STAGES = ("backward", "forward")
_CHUNK_ELEMENTS = 2**28  # random draws per call: well inside 32-bit counters


def random_normal(key, shape, dtype=jnp.bfloat16):
    """Normal draws of `shape` [1, T, H, D], made in chunks of T so that no single draw has
    2**32 or more elements (q has 2**33 at T = 1M)."""
    chunks = 1
    while np.prod(shape) // chunks > _CHUNK_ELEMENTS and shape[1] % (2 * chunks) == 0:
        chunks *= 2
    part = (shape[0], shape[1] // chunks, *shape[2:])
    draw = jax.lax.map(lambda k: jax.random.normal(k, part, dtype), jax.random.split(key, chunks))
    return jnp.moveaxis(draw, 0, 1).reshape(shape)


def problem(t: int, hq: int, hkv: int, d: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    make = jax.jit(random_normal, static_argnums=1)
    q, k, v = (make(key, (1, t, h, d)) for key, h in zip(keys, (hq, hkv, hkv)))
    gates = jax.nn.sigmoid(jax.random.normal(keys[3], (1, t, hq, 3))).astype(jnp.bfloat16)
    return q, k, v, gates


SLICES = ("first", "middle", "last")


def row_slices(t: int, rows: int) -> dict[str, np.ndarray]:
    """{"first", "middle", "last": ascending positions}: the first, middle and last `rows`
    positions of T; when T is small a row in two slices stays in the earlier one (a slice may
    end up empty and is then left out). Concatenated in order they ascend."""
    slices, taken = {}, np.zeros(0, np.int64)
    for name, start in zip(SLICES, (0, t // 2 - rows // 2, t - rows)):
        part = np.setdiff1d(np.arange(start, start + rows).clip(0, t - 1), taken)
        if part.size:
            slices[name], taken = part, np.concatenate([taken, part])
    return slices


def slice_rows(t: int, rows: int) -> np.ndarray:
    """The rows of every slice, ascending."""
    return np.concatenate(list(row_slices(t, rows).values()))


def kernel_loss(q, k, v, gates, rows, weight):
    out, aux = ops.nsa_attention(q, k, v, gates, CFG, return_aux=True)
    return jnp.sum(out[:, rows].astype(jnp.float32) * weight), (out, aux["indices"][:, rows])


def reference_loss(q_rows, k, v, gates_rows, rows, weight):
    """The loss on the slices through xla decoding: one query per step, caches = the sequence."""
    k_cmp, v_cmp = (ops.compress(x, CFG, implementation="xla") for x in (k, v))

    def one(args):
        q_t, g_t, t = args
        out, aux = ops.nsa_decode_attention(q_t[None], k, v, k_cmp, v_cmp, g_t[None], t[None],
                                            CFG, implementation="xla", return_aux=True)
        return out[0], aux["indices"][0]

    out, indices = jax.lax.map(one, (q_rows[0], gates_rows[0], rows))
    return jnp.sum(out[None].astype(jnp.float32) * weight), (out[None], indices[None])


def rel(a, b) -> float:
    """Relative L2 error of a against b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def peak_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def reference_by_slice(slices: dict, q, k, v, gates, weight, backward: bool, stages: Stages):
    """reference_loss's outputs (out, indices, and with `backward` the gradients) over every
    slice's rows, one slice per call (a start and an end line each, so a long reference shows
    its progress): -> (out, indices, grads), the rows of all slices in order; dk and dv summed
    over the slices (the loss is a sum over rows)."""
    argnums = (0, 1, 2, 3) if backward else ()
    reference = jax.jit(jax.value_and_grad(reference_loss, argnums=argnums, has_aux=True)
                        if backward else lambda *a: (reference_loss(*a), None))
    outs, indices, grads, first = [], [], [], 0
    for name, part in slices.items():
        rows = jnp.asarray(part, jnp.int32)
        with stages.stage(f"reference, {name} slice (rows {part[0]}..{part[-1]})"):
            (_, (out, index)), grad = jax.block_until_ready(reference(
                q[:, rows], k, v, gates[:, rows], rows, weight[:, first:first + part.size]))
        outs.append(out), indices.append(index), grads.append(grad)
        first += part.size
    cat = lambda xs: jnp.concatenate(xs, axis=1)
    if not backward:
        return cat(outs), cat(indices), None
    total = lambda i: sum(g[i].astype(jnp.float32) for g in grads)
    return cat(outs), cat(indices), (cat([g[0] for g in grads]), total(1), total(2),
                                     cat([g[3] for g in grads]))


def run_stage(stage: str, args) -> dict:
    """One stage's record: sizes, errors, checks, ok, then (only if ok) ms and peak GiB."""
    stages = Stages(stage)
    t = args.length if stage == "backward" else args.forward_length
    hq, d = args.q_heads, args.head_dim
    with stages.stage(f"inputs: B=1 T={t} Hq={hq} Hkv={args.kv_heads} D={d} bf16"):
        q, k, v, gates = jax.block_until_ready(problem(t, hq, args.kv_heads, d))
    slices = row_slices(t, args.rows)
    rows = jnp.asarray(np.concatenate(list(slices.values())), jnp.int32)
    weight = jax.random.normal(jax.random.PRNGKey(1), (1, rows.size, hq, d))
    stages.say(f"{jax.devices()[0].device_kind}, {CFG}; backend {ops.backend()}; {rows.size} "
               f"rows checked in {len(slices)} slices")
    record = {"stage": stage, "T": t, "Hq": hq, "Hkv": args.kv_heads, "D": d,
              "rows": int(rows.size), "backend": ops.backend()}
    backward = stage == "backward"
    kernel = jax.jit(jax.value_and_grad(kernel_loss, argnums=(0, 1, 2, 3), has_aux=True)
                     if backward else lambda *a: (kernel_loss(*a), None))
    with stages.stage("the op's first call (compilation included)"):
        start = stages.elapsed()
        (_, (out, indices)), grads = jax.block_until_ready(kernel(q, k, v, gates, rows, weight))
        record["first_call_s"] = round(stages.elapsed() - start, 1)
    record["peak_gib"] = round(peak_gib(), 2)  # inputs + the op; before the reference runs

    want_out, want_indices, want = reference_by_slice(slices, q, k, v, gates, weight, backward,
                                                      stages)
    same = np.all(np.asarray(indices) == np.asarray(want_indices), axis=-1)  # [1, R, Hkv]
    agree = same.all(axis=-1)[0]  # rows whose every KV head selected the same blocks
    on_rows = lambda x: np.asarray(x[0, rows])[agree]
    errors = {"out": rel(on_rows(out), np.asarray(want_out[0])[agree])}
    if backward:
        errors.update(dq=rel(on_rows(grads[0]), np.asarray(want[0][0])[agree]),
                      dgates=rel(on_rows(grads[3]), np.asarray(want[3][0])[agree]),
                      dk=rel(grads[1], want[1]), dv=rel(grads[2], want[2]))
        record["dq_zero_elsewhere"] = float(jnp.abs(grads[0][0].at[rows].set(0)).max()) == 0.0
    record.update(errors={name: float(f"{e:.2e}") for name, e in errors.items()},
                  flipped=float(1 - same.mean()), finite=bool(jnp.isfinite(out).all()))
    record["ok"] = bool(all(e < TOLERANCE for e in errors.values()) and agree.any()
                        and record["flipped"] <= MAX_FLIPPED and record["finite"]
                        and record.get("dq_zero_elsewhere", True))
    stages.say(f"checks: {json.dumps(record)}")
    if record["ok"]:
        del out, grads, want  # timing needs room for one more call's outputs
        # the compiled first call again: a new jit of the same function would compile it anew
        with stages.stage(f"timing: {args.repeats} call(s) after one warm-up"):
            record["ms"] = round(median_ms(kernel, q, k, v, gates, rows, weight,
                                           iters=args.repeats, warmup=1), 1)
        record["peak_gib"] = round(peak_gib(), 2)
    return record


def _stage_in_subprocess(stage: str, args, out_dir: pathlib.Path | None,
                         timeout_s: float | None) -> dict:
    """Runs `--stage stage` in a fresh Python, its output streamed (and logged to out_dir line
    by line), stopped after timeout_s; its last stdout line is the record's JSON."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
             if name in SMOKE]
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                                    os.environ.get("PYTHONPATH")]))}
    done = run_streamed([sys.executable, "-m", "experiments.long_context_check", "--stage",
                         stage, *flags], cwd=root, env=env, prefix=f"  {stage}| ",
                        log_path=None if out_dir is None else out_dir / f"long_context_{stage}.log",
                        timeout_s=timeout_s)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    why = f"stopped at its {timeout_s:.0f} s limit" if done.timed_out else f"exit {done.returncode}"
    return {"stage": stage, "ok": False, "crashed": f"{why}: {tail[-400:]}"}


def table(records: list[dict]) -> str:
    lines = ["| stage | T | ok | ms | peak GiB | rel. errors | flipped | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r.get("errors", {}).items())
        lines.append(f"| {r['stage']} | {r.get('T', '')} | {'PASS' if r['ok'] else 'FAIL'} | "
                     f"{r.get('ms', '')} | {r.get('peak_gib', '')} | {errors} | "
                     f"{r.get('flipped', 0):.2%} | {r.get('crashed', '')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=524288, help="T of the fwd+bwd stage")
    parser.add_argument("--forward-length", type=int, default=1048576,
                        help="T of the forward stage")
    parser.add_argument("--rows", type=int, default=128, help="rows per checked slice")
    parser.add_argument("--q-heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="overall seconds for both stages; a stage gets what is left over "
                        "the stages still to run (default 540; none with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=f"CPU sizes: {SMOKE}")
    parser.add_argument("--stage", choices=STAGES, help="run one stage here (internal)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.budget_s is None:
        args.budget_s = math.inf if args.smoke else 540.0
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:  # the child: the record's JSON is the last line
        print(json.dumps(run_stage(args.stage, args)))
        return 0
    out_dir = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages("long_context_check")
    stages.say(f"plan: stage backward (fwd+bwd at T={args.length}), then stage forward (T="
               f"{args.forward_length}), each in its own Python; B=1 Hq={args.q_heads} "
               f"Hkv={args.kv_heads} D={args.head_dim}, {args.rows} rows per slice; --budget-s "
               f"{args.budget_s:.0f}, each stage's limit what is left over the stages to run")
    records = []
    for number, stage in enumerate(STAGES):
        limit = stages.left(args.budget_s) / (len(STAGES) - number)
        with stages.stage(f"stage {stage}" + ("" if math.isinf(limit) else
                                               f" (limit {limit:.0f} s)")):
            records.append(_stage_in_subprocess(stage, args, out_dir,
                                                None if math.isinf(limit) else max(limit, 1.0)))
        stages.say(f"{stage}: {'PASS' if records[-1]['ok'] else 'FAIL'}")
        if out_dir is not None:  # what is known so far, should a later stage be killed
            (out_dir / "long_context_check.json").write_text(json.dumps(records, indent=1))
    print(table(records), flush=True)
    ok = all(r["ok"] for r in records)
    print("PASS" if ok else "FAIL: see the table (a crash's log is under $OUT when set)",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
