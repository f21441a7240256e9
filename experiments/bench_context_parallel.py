"""Context parallelism on the GPUs of one machine (docs/scaling.md): nsa_attention's forward +
backward with the sequence split over N GPUs, and small_nsa trained at N x one GPU's tokens.

    python experiments/bench_context_parallel.py [--quick] [--parts check op train] [--out FILE]

check (first, and the run stops if it fails): float32 nsa_attention (xla) at --check-length
tokens, paper heads, one document and packed documents whose boundaries fall inside shards, on
the context axis of all N GPUs in every layout against the same op on one GPU: the largest
relative error of the output and of the gradients w.r.t. q, k, v, gates must stay within
--check-tolerance (selected blocks may differ only where float rounding ties them).

op: the paper shape (B=1, Hq=64, Hkv=4, D=128, bf16; l=32, d=16, l'=64, n=16, w=512) at each of
--op-lengths tokens (default 262144 1048576) on a context axis of all N GPUs, once per --layouts
(plain, zigzag), and on one GPU at the lengths in --one-gpu-lengths (default 262144) with the xla
and the pallas implementation. Inputs are random and created already split (a device never holds
more than its shard); time = `jax.vjp` of nsa_attention w.r.t. q, k, v, gates plus the pullback of
a random cotangent, median of --samples calls after one warm-up call; memory = the compiled
program's per-GPU estimate (arguments + outputs + temporaries - aliases) and the largest
peak_bytes_in_use over the GPUs so far in the process (so it never decreases from row to row).
Under context parallelism every branch runs its xla implementation (dispatch.query_shard).

train: `python -m nsa_jax.train --config configs/small_nsa.py` with batch 1 for --steps steps, at
--train-length tokens with mesh.context=N, then at --train-length / N on one GPU with
model.implementation xla and with the default (pallas); tokens/s = mean of the logged values
after the first log window; scaling efficiency = tokens/s on N GPUs / (N x tokens/s on one).

--quick: op at 16384 and 65536 (one GPU at 16384), train at 16384 for 6 steps: minutes, to check
that everything runs before the long measurement. Prints markdown tables; --out (default
$OUT/bench_context_parallel.md when $OUT is set) also writes them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nsa_jax import NSAConfig, ops  # noqa: E402
from nsa_jax.ops.context_parallel import (CONTEXT_AXIS, LAYOUTS, from_layout,  # noqa: E402
                                          to_layout)

HQ, HKV, D = 64, 4, 128  # the paper shape (experiments/bench_kernels.py SHAPES["paper"])
ERROR_NAMES = ("out", "dq", "dk", "dv", "dgates")  # what the check compares


def mesh_of(devices: int):
    return jax.make_mesh((devices,), (CONTEXT_AXIS,), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:devices])


def sharded_inputs(length: int, mesh):
    """q, k, v, gates and a cotangent [1, T, ...] bf16, each device generating its own rows."""
    split = NamedSharding(mesh, P(None, CONTEXT_AXIS))

    def make():
        keys = jax.random.split(jax.random.PRNGKey(length), 5)
        shape = lambda heads, dim: (1, length, heads, dim)
        normal = lambda key, s: jax.random.normal(key, s, jnp.bfloat16)
        gates = jax.nn.sigmoid(normal(keys[3], shape(HQ, 3)))
        return (normal(keys[0], shape(HQ, D)), normal(keys[1], shape(HKV, D)),
                normal(keys[2], shape(HKV, D)), gates, normal(keys[4], shape(HQ, D)))

    return jax.jit(make, out_shardings=(split,) * 5)()


def forward_backward(implementation, layout):
    def run(q, k, v, gates, cotangent):
        attend = lambda *x: ops.nsa_attention(*x, NSAConfig(), implementation=implementation,
                                              context_layout=layout)
        out, pullback = jax.vjp(attend, q, k, v, gates)
        return out, *pullback(cotangent)
    return jax.jit(run)


def check_inputs(length: int, packed: bool):
    """float32 q, k, v, gates [1, T, ...] (paper heads) and segment_ids: None, or 5 documents
    with boundaries at odd places (inside every shard for N <= 8)."""
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    normal = lambda key, heads, dim: jax.random.normal(key, (1, length, heads, dim), jnp.float32)
    arrays = (normal(keys[0], HQ, D), normal(keys[1], HKV, D), normal(keys[2], HKV, D),
              jax.nn.sigmoid(normal(keys[3], HQ, 3)))
    cuts = jnp.asarray([length * f // 17 + 3 for f in (3, 7, 9, 14)])
    segment_ids = jnp.sum(jnp.arange(length)[None, :, None] >= cuts, -1).astype(jnp.int32)
    return arrays, (segment_ids if packed else None)


def loss_and_grads(segment_ids, layout: str):
    def loss(q, k, v, gates):
        out = ops.nsa_attention(q, k, v, gates, NSAConfig(), segment_ids=segment_ids,
                                implementation="xla", context_layout=layout)
        return jnp.sum(jnp.sin(out)), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def relative_error(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def check(length: int, devices: int, layouts, tolerance: float) -> list[dict]:
    """Sharded vs one-GPU errors for every layout, unpacked and packed; SystemExit beyond
    tolerance (or on a non-finite value)."""
    rows = []
    for packed in (False, True):
        arrays, segment_ids = check_inputs(length, packed)
        (_, want_out), want_grads = loss_and_grads(segment_ids, "plain")(*arrays)
        for layout in layouts:
            to = lambda x: None if x is None else to_layout(x, layout, devices)
            with jax.set_mesh(mesh_of(devices)):
                (_, out), grads = loss_and_grads(to(segment_ids), layout)(*map(to, arrays))
            back = lambda x: from_layout(x, layout, devices)
            errors = {"out": relative_error(back(out), want_out)}
            errors.update({f"d{name}": relative_error(back(g), w) for name, g, w in
                           zip(("q", "k", "v", "gates"), grads, want_grads)})
            rows.append({"T": length, "GPUs": devices, "layout": layout, "packed": packed,
                         **errors})
    bad = [r for r in rows if not all(math.isfinite(r[k]) and r[k] <= tolerance
                                      for k in ERROR_NAMES)]
    if bad:
        raise SystemExit(f"context parallelism differs from one GPU beyond {tolerance}:\n"
                         + check_table(rows))
    return rows



def check_table(rows: list[dict]) -> str:
    lines = ["| T | GPUs | layout | packed | " + " | ".join(f"rel. err. {n}" for n in ERROR_NAMES)
             + " |", "|---|---|---|---|" + "---|" * len(ERROR_NAMES)]
    lines += [f"| {r['T']:,} | {r['GPUs']} | {r['layout']} | {r['packed']} | "
              + " | ".join(f"{r[n]:.1e}" for n in ERROR_NAMES) + " |" for r in rows]
    return "\n".join(lines)


def peak_gib() -> float:
    return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices()) / 2**30


def time_op(length: int, devices: int, layout: str, implementation, samples: int) -> dict:
    mesh = mesh_of(devices)
    with jax.set_mesh(mesh):
        args = sharded_inputs(length, mesh)
        compiled = forward_backward(implementation, layout).lower(*args).compile()
        m = compiled.memory_analysis()
        estimate = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes) / 2**30
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(1e3 * (time.perf_counter() - start))
    return {"T": length, "GPUs": devices, "layout": layout if devices > 1 else "-",
            "implementation": "xla" if devices > 1 else implementation,
            "ms": statistics.median(times), "compiled_gib": estimate, "peak_gib": peak_gib()}


def op_table(rows: list[dict]) -> str:
    lines = ["| T | GPUs | layout | implementation | fwd+bwd (ms) | per-GPU memory, compiled (GiB) "
             "| peak so far (GiB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['T']:,} | {r['GPUs']} | {r['layout']} | {r['implementation']} | "
              f"{r['ms']:,.0f} | {r['compiled_gib']:.1f} | {r['peak_gib']:.1f} |" for r in rows]
    return "\n".join(lines)


def train_run(length: int, context: int, implementation: str | None, args, root) -> dict:
    workdir = root / f"T{length}_context{context}_{implementation}"
    log_every = max(args.steps // 3, 1)
    command = [sys.executable, "-m", "nsa_jax.train", "--config", "configs/small_nsa.py",
               "--workdir", str(workdir), f"--config.steps={args.steps}",
               f"--config.log_every={log_every}", f"--config.eval_every={args.steps}",
               f"--config.checkpoint_every={args.steps}", "--config.eval_batches=1",
               f"--config.optimizer.warmup_steps={max(args.steps // 6, 1)}",
               f"--config.data.seq_len={length}", "--config.data.batch_size=1",
               "--config.mesh.data=1", "--config.mesh.fsdp=1", f"--config.mesh.context={context}"]
    if implementation is not None:
        command.append(f"--config.model.implementation={implementation}")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    print(done.stdout.splitlines()[0], flush=True)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and r["step"] > log_every]
    return {"T": length, "GPUs": context, "implementation": implementation or "default (pallas)",
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in train),
            "peak_gib": max(r.get("peak_memory_gib", float("nan")) for r in train),
            "wall_s": time.perf_counter() - started}


def train_table(rows: list[dict]) -> str:
    context = rows[0]
    lines = ["| T per sequence | GPUs (context) | implementation | tokens/s | efficiency vs "
             "this row | peak GiB (GPU 0) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        efficiency = ("-" if r is context else
                      f"{context['tokens_per_s'] / (context['GPUs'] * r['tokens_per_s']):.2f}")
        lines.append(f"| {r['T']:,} | {r['GPUs']} | {r['implementation']} | "
                     f"{r['tokens_per_s']:,.0f} | {efficiency} | {r['peak_gib']:.1f} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["check", "op", "train"],
                        choices=["check", "op", "train"])
    parser.add_argument("--check-length", type=int, default=16384)
    parser.add_argument("--check-tolerance", type=float, default=1e-4)
    parser.add_argument("--devices", type=int, default=jax.device_count())
    parser.add_argument("--op-lengths", type=int, nargs="+", default=[262144, 1048576])
    parser.add_argument("--one-gpu-lengths", type=int, nargs="*", default=[262144])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--train-length", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=(  # $OUT: the device machine's
        pathlib.Path(os.environ["OUT"]) / "bench_context_parallel.md" if "OUT" in os.environ
        else None))
    args = parser.parse_args()
    if args.quick:
        args.op_lengths, args.one_gpu_lengths, args.train_length, args.steps = (
            [16384, 65536], [16384], 16384, 6)
        args.check_length = min(args.check_length, 4096)
    print(f"{args.devices} x {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    tables = []

    def report(text: str) -> None:
        print(text, flush=True)
        if args.out:
            args.out.write_text("\n\n".join(tables + [text]) + "\n")

    if "check" in args.parts:
        text = check_table(check(args.check_length, args.devices, args.layouts,
                                 args.check_tolerance))
        report(text)
        tables.append(text)
    if "op" in args.parts:
        rows = []
        for length in sorted(set(args.op_lengths) | set(args.one_gpu_lengths)):
            runs = [(args.devices, layout, None) for layout in args.layouts
                    if length in args.op_lengths]
            runs += [(1, "plain", impl) for impl in ("xla", "pallas")
                     if length in args.one_gpu_lengths]
            for devices, layout, implementation in runs:
                rows.append(time_op(length, devices, layout, implementation, args.samples))
                report(op_table(rows))
        tables.append(op_table(rows))
    if "train" in args.parts:
        rows = []
        with tempfile.TemporaryDirectory() as root:
            for length, context, implementation in (
                    (args.train_length, args.devices, None),
                    (args.train_length // args.devices, 1, "xla"),
                    (args.train_length // args.devices, 1, None)):
                rows.append(train_run(length, context, implementation, args, pathlib.Path(root)))
                report(train_table(rows))
        tables.append(train_table(rows))


if __name__ == "__main__":
    main()
