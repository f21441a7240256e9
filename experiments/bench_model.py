"""NSA vs full attention in the model on one GPU (issue 18 item 3): trainer tokens/s and profile.

Training tokens/s measured with the trainer itself, the ratios NSA/full against the targets, and
a profile of one NSA training step.

    python experiments/bench_model.py [--steps 18] [--models nsa_8k,full_8k_packed,...]
    python experiments/bench_model.py --smoke           # CPU, toy sizes, every part (< 2 min)

1. Throughput: each model (ARMS) is `python -m nsa_jax.train --config ...` in its own process,
   one after another, shrunk to --steps steps with evaluation and checkpointing only at the ends
   (experiments/trainer_throughput.py); tokens/s = mean of the logged tokens_per_s after the
   first log window (compilation excluded). configs/small_nsa.py vs configs/small_full.py at 8k
   (batch 4), configs/long_32k.py vs the same with model.attention=full at 32k (batch 1; the way
   small_full differs from small_nsa). The full models run with packed rows (documents packed: a
   dense [T, T] document mask goes to the attention) and unpacked ones (data.packed=false: no
   segment ids, plain causal attention), so a slow baseline cannot flatter the ratio: the ratios
   NSA/full are given against both, with PASS/MISS against the targets (>= 1.0x at 8k, >= 3x at
   32k).
2. Profile: in this process, after the runs (so the trainers had the GPU to themselves), the
   trainer's own train step for --profile-model, compiled, then --profile-steps steps under
   jax.profiler; kernel time by category (experiments/step_profile.py), ms per step and share.

Progress: the plan (every run with its estimated seconds) first, then a start and an end line
per run and for the profile, stamped with seconds since the start, and every trainer line as the
trainer prints it (prefixed with the model's name; experiments/streaming.py). With --out (default
$OUT when set) it writes bench_model.json and bench_model.md there at the start (the plan) and
after every run, and each trainer's log as bench_model_<model>.log line by line, so a run killed
from outside still leaves what it had. Extra arguments (--config.key=value) override every
model's config. Runs and the profile share a persistent compilation cache (the profile's step is
the nsa_8k trainer's program). Off --smoke the trainers get JAX_PLATFORMS=cuda (unless set), so
a trainer that cannot see the GPU fails at once instead of training on the CPU for hours.

Time: the trainer's steps are cheap (0.1-0.55 s each on an H200 at these shapes,
docs/benchmarks.md), but each run pays start-up: CUDA and imports, the model built in jit, the
evaluation and train steps compiled (12 unrolled layers, each with the NSA kernels forward and
backward, and XLA's autotuning on a cold cache), two evaluations and a checkpoint. bench_scaling's
1-GPU run spent ~100 s of its 120 s on that (docs/benchmarks.md, 2026-11-23), the estimate used
here (experiments/budget.py: STARTUP_S + FLOPs at the measured rate); a run of the current
kernels was not yet timed (on 2026-11-30 nsa_8k did not finish within a 300 s call, reason
unknown: its output was held back until its end), so the estimates are lower bounds. --budget-s
(default 540, for a 600 s call: run it under `timeout` of at least --budget-s + 60) covers
everything, the first run included: no run or profile starts that its estimate or the longest
run so far says would end past it, a run still going at the budget's end is stopped (SIGTERM,
the trainer checkpoints and exits), and the report names what was skipped or cut, to run with
--models in a second call.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.budget import STARTUP_S, training_seconds  # noqa: E402
from experiments.streaming import Stages  # noqa: E402
from experiments.trainer_throughput import (TrainerCutOff, shrunk_overrides,  # noqa: E402
                                            trainer_throughput)
from nsa_jax.train import parse_train_args, resolve  # noqa: E402

FULL = "--config.model.attention=full"
UNPACKED = "--config.data.packed=false"
# name -> (context label, config file, overrides); the first arm of a context is its NSA model
ARMS = {
    "nsa_8k": ("8k", "configs/small_nsa.py", ()),
    "full_8k_packed": ("8k", "configs/small_full.py", ()),
    "full_8k_unpacked": ("8k", "configs/small_full.py", (UNPACKED,)),
    "nsa_32k": ("32k", "configs/long_32k.py", ()),
    "full_32k_packed": ("32k", "configs/long_32k.py", (FULL,)),
    "full_32k_unpacked": ("32k", "configs/long_32k.py", (FULL, UNPACKED)),
}
# run in this order, the ones every ratio needs first (full_32k_unpacked: --models)
DEFAULT_ARMS = ("nsa_8k", "full_8k_packed", "full_8k_unpacked", "nsa_32k", "full_32k_packed")
TARGETS = {"8k": 1.0, "32k": 3.0}  # NSA tokens/s over full attention's (issue 18)
# --smoke: every arm on the CPU at toy size; "32k" stands for twice the "8k" length there
SMOKE_CONFIG = "configs/tiny.py"
SMOKE_OVERRIDES = {"8k": ("--config.data.seq_len=128",), "32k": ("--config.data.seq_len=256",)}
SMOKE_SHRINK = ("--config.data.batch_size=2", "--config.model.num_layers=1",
                "--config.model.d_model=64", "--config.model.mlp_hidden=128")


def arm_command(name: str, smoke: bool) -> tuple[str, list[str]]:
    """-> (config file, overrides) of arm `name`; --smoke swaps in the tiny config."""
    context, config, overrides = ARMS[name]
    if smoke:  # the tiny NSA model; a full arm's attention swap made explicit
        swap = (FULL,) if name.startswith("full_") else ()
        return SMOKE_CONFIG, [*SMOKE_SHRINK, *SMOKE_OVERRIDES[context], *swap,
                              *(o for o in overrides if o != FULL)]
    return config, list(overrides)


def run_estimate_s(name: str, args, extra: list[str]) -> float:
    """Estimated seconds of arm `name`'s run on one H200: start-up plus its training FLOPs at
    the measured rate (experiments/budget.py; a lower bound, see the module docstring)."""
    config, overrides = arm_command(name, args.smoke)
    config_dict, _ = parse_train_args(["--config", config, *shrunk_overrides(args.steps),
                                       *overrides, *extra])
    return STARTUP_S + training_seconds(resolve(config_dict))


def plan(names: list[str], estimates: dict, args) -> str:
    """What this call will do, in order, with the estimates, before anything starts."""
    lines = [f"plan: {len(names)} trainer run(s) of {args.steps} steps, then the profile of "
             f"{args.profile_model or '(none)'}; --budget-s {args.budget_s:.0f}; estimated "
             f"seconds on one H200 (lower bounds; --smoke runs on the CPU):"]
    lines += [f"  {name}: ~{estimates[name]:.0f} s" for name in names]
    if args.profile_model:
        lines.append(f"  profile of {args.profile_model}: about one run's start-up "
                     f"(~{STARTUP_S:.0f} s; the compilation cache shortens it)")
    lines.append(f"  total ~{sum(estimates.values()) + STARTUP_S * bool(args.profile_model):.0f} s")
    return "\n".join(lines)


def throughput_table(results: dict) -> str:
    """Markdown, one row per run (its overrides are in the JSON report)."""
    lines = ["| model | config | tokens/s | first step (s) | final loss | peak GiB | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        first = "-" if r["first_step_s"] is None else f"{r['first_step_s']:.0f}"
        lines.append(f"| {name} | {r['config']} | {r['tokens_per_s']:,.0f} | {first} | "
                     f"{r['loss']:.3f} | {peak} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def ratios(results: dict) -> list[dict]:
    """NSA tokens/s over each full-attention arm of the same context that was run."""
    rows = []
    for context, target in TARGETS.items():
        nsa = results.get(f"nsa_{context}")
        for layout in ("packed", "unpacked"):
            full = results.get(f"full_{context}_{layout}")
            if nsa and full:
                ratio = nsa["tokens_per_s"] / full["tokens_per_s"]
                rows.append({"context": context, "baseline": f"full, {layout} rows",
                             "ratio": ratio, "target": target,
                             "verdict": "PASS" if ratio >= target else "MISS"})
    return rows


def ratio_table(rows: list[dict]) -> str:
    lines = ["| context | NSA / | ratio | target | |", "|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['baseline']} | {r['ratio']:.2f}x | >= {r['target']:.1f}x | "
              f"{r['verdict']} |" for r in rows]
    return "\n".join(lines)


def write(out: pathlib.Path | None, report: dict, markdown: str) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_model.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "bench_model.md").write_text(markdown + "\n")


def compilation_cache(root: pathlib.Path) -> dict:
    """Environment for a persistent compilation cache in `root`, shared by the trainers and this
    process: the profile's NSA step is the program its trainer compiled (same config and
    overrides), so it is read back instead of compiled again."""
    return {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def over_budget(args, stages: Stages, expected_s: float, what: str, report: dict) -> bool:
    """True (and noted in the report) if `what`, expected to take `expected_s`, would end past
    --budget-s."""
    left = stages.left(args.budget_s)
    if expected_s <= left:
        return False
    note = f"skipped {what}: would take ~{expected_s:.0f} s, {left:.0f} s of --budget-s left"
    stages.say(note)
    report["skipped"].append(note)
    return True


def run_arms(names: list[str], args, extra: list[str], report: dict, env: dict,
             root: pathlib.Path, stages: Stages) -> str:
    """Trains each arm in turn, its output streamed: none started that its estimate or the
    longest run so far says would end past --budget-s, and one still running at the budget's
    end stopped; -> the markdown of the throughput and ratio tables."""
    markdown = ""
    for name in names:
        walls = [r["wall_s"] for r in report["throughput"].values()]
        estimate = 0.0 if args.smoke else report["estimates_s"][name]  # H200 seconds
        expected = max([estimate, *walls])
        if over_budget(args, stages, expected, name, report):
            continue
        config, overrides = arm_command(name, args.smoke)
        overrides += extra
        log = None if args.out is None else args.out / f"bench_model_{name}.log"
        try:
            with stages.stage(f"run {name}", expected):
                result = trainer_throughput(
                    config, root / name, args.steps, overrides, env, prefix=f"  {name}| ",
                    log_path=log, timeout_s=None if math.isinf(args.budget_s)
                    else max(stages.left(args.budget_s), 1.0))
        except TrainerCutOff as cut:
            report["skipped"].append(f"cut {name} at the end of --budget-s: {cut}")
            write(args.out, report, markdown)
            break
        except SystemExit as failed:  # the report keeps the runs before it, and why it stopped
            report["failed"] = f"{name}: {str(failed)[-2000:]}"
            write(args.out, report, markdown)
            raise
        del result["header"]  # already printed with the trainer's lines
        report["throughput"][name] = {"config": config, "overrides": overrides, **result}
        report["ratios"] = ratios(report["throughput"])
        markdown = (f"## Training throughput ({args.steps} steps per model)\n\n"
                    f"{throughput_table(report['throughput'])}\n\n{ratio_table(report['ratios'])}")
        print(markdown, flush=True)
        write(args.out, report, markdown)
    return markdown


def run_profile(args, extra: list[str], report: dict, env: dict, root: pathlib.Path) -> str:
    """Profiles --profile-model's train step in this process (the trace in `root`, its perfetto
    file copied to --out as step_trace.json.gz); -> the tables' markdown."""
    import jax

    from experiments.step_profile import profile_table, profile_train_step

    for key, value in env.items():  # the trainers' compilation cache
        jax.config.update(key.lower(), value if key.endswith("DIR") else int(value))

    config, overrides = arm_command(args.profile_model, args.smoke)
    config_dict, _ = parse_train_args(["--config", config, *shrunk_overrides(args.steps),
                                       *overrides, *extra])
    profile = profile_train_step(config_dict, args.profile_steps, root / "trace")
    if args.out:  # the xplane files beside it are large; the perfetto file opens in ui.perfetto.dev
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(next((root / "trace").rglob("perfetto_trace.json.gz")),
                    args.out / "step_trace.json.gz")
    report["profile"] = {"model": args.profile_model,
                         **{k: v for k, v in profile.items() if k != "trace_dir"}}
    table = profile_table(profile)
    top = "\n".join(f"| {c} | {k[:60]} | {op} | {ms:.3f} |" for c, k, op, ms in profile["top"])
    return (f"## Where one {args.profile_model} training step's device time goes "
            f"({profile['kernels']} kernel events over {args.profile_steps} steps)\n\n{table}\n\n"
            f"| category | kernel | HLO op | ms per step |\n|---|---|---|---|\n{top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=18, help="steps per training run")
    parser.add_argument("--models", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--profile-model", default="nsa_8k", help="'' to skip the profile")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="overall seconds, the first run included: start no run or "
                        "profile expected to end past it, stop a run still going at its end "
                        "(default 540; none with --smoke, whose runs are judged by their "
                        "measured times only)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, toy sizes, 6 steps")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args, extra = parser.parse_known_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names + [args.profile_model] if n and n not in ARMS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(ARMS)}")
    if args.smoke:
        args.steps = 6
    if args.budget_s is None:
        args.budget_s = math.inf if args.smoke else 540.0
    stages = Stages("bench_model")
    estimates = {name: run_estimate_s(name, args, extra) for name in names}
    report = {"argv": sys.argv[1:], "plan": plan(names, estimates, args),
              "estimates_s": estimates, "throughput": {}, "ratios": [], "skipped": []}
    stages.say(report["plan"])
    write(args.out, report, report["plan"])
    with tempfile.TemporaryDirectory() as root:
        env = compilation_cache(pathlib.Path(root))
        platform = {} if args.smoke else {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cuda")}
        markdown = run_arms(names, args, extra, report, {**env, **platform}, pathlib.Path(root),
                            stages)
        profiled = report["throughput"].get(args.profile_model, {})
        expected = profiled.get("wall_s", STARTUP_S)
        if args.profile_model and not over_budget(args, stages, expected, "the profile", report):
            with stages.stage(f"profile of {args.profile_model}", expected):
                profile = run_profile(args, extra, report, env, pathlib.Path(root))
            print(profile, flush=True)
            markdown += "\n\n" + profile
    if report["skipped"]:
        markdown += "\n\n" + "\n".join(f"* {note}" for note in report["skipped"])
    report["wall_s"] = stages.elapsed()
    write(args.out, report, markdown)
    stages.say(f"bench_model: done in {report['wall_s']:.0f} s" +
               (f"; skipped or cut: {len(report['skipped'])}" if report["skipped"] else ""))


if __name__ == "__main__":
    main()
