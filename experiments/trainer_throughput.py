"""Training throughput measured with the trainer itself: `python -m nsa_jax.train` in a
subprocess, shrunk to a few steps with evaluation and checkpointing only at the ends, its tokens/s
read back from the run's metrics.jsonl. Shared by bench_scaling.py and bench_model.py.

Throughput is the mean of the logged tokens_per_s after the first log window: the trainer starts
its first window's clock after the first (compiling) step, and the later windows are steady state.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
import sys

from experiments.streaming import run_streamed

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_STEP = re.compile(r"compiled and ran the first step in ([\d.]+) s")  # the trainer's line


def shrunk_overrides(steps: int) -> list[str]:
    """--config overrides for a `steps`-step timing run: three log windows, one evaluation batch
    and one checkpoint at the ends, warmup short enough for the schedule's check."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first window holds compilation), got {steps}")
    return [f"--config.steps={steps}", f"--config.log_every={log_every(steps)}",
            f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
            "--config.eval_batches=1", f"--config.optimizer.warmup_steps={max(steps // 6, 1)}"]


def log_every(steps: int) -> int:
    return max(steps // 3, 1)


class TrainerCutOff(TimeoutError):
    """The trainer was stopped at its time limit before it finished."""


def trainer_throughput(config: str, workdir: pathlib.Path, steps: int, overrides=(),
                       env: dict | None = None, *, prefix: str = "",
                       log_path: pathlib.Path | None = None,
                       timeout_s: float | None = None) -> dict:
    """Trains `config` (a config file path, relative to the repository or absolute) for `steps`
    steps in `workdir` (fresh) with `overrides` (--config.key=value strings, after the shrinking
    ones so they win) -> {"tokens_per_s", "loss", "val_loss", "peak_memory_gib" (GPU only, else
    None), "first_step_s" (compilation and the first step), "wall_s", "header"}; `env` entries
    are added to the trainer's environment. The trainer's output is printed line by line as it
    comes, after `prefix`, and written to `log_path` (experiments/streaming.py). Raises
    TrainerCutOff if it runs past `timeout_s` seconds; exits with its output tail if it fails."""
    command = [sys.executable, "-m", "nsa_jax.train", "--config", str(config),
               "--workdir", str(workdir), *shrunk_overrides(steps), *overrides]
    print(f"{prefix}$ {' '.join(command)}", flush=True)
    done = run_streamed(command, cwd=REPO, env={**os.environ, **(env or {})}, prefix=prefix,
                        log_path=log_path, timeout_s=timeout_s)
    if done.timed_out:
        raise TrainerCutOff(f"{config} stopped at its {timeout_s:.0f} s limit (ran "
                            f"{done.wall_s:.0f} s); its last lines: "
                            f"{' | '.join(done.stdout.splitlines()[-3:])}")
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    steady = [r["tokens_per_s"] for r in train if r["step"] > log_every(steps)]
    if not steady:
        raise SystemExit(f"{config}: no log window after the first one in {workdir}; raise steps")
    return {"tokens_per_s": statistics.mean(steady), "loss": train[-1]["loss"],
            "val_loss": [r for r in records if "val_loss" in r][-1]["val_loss"],
            "peak_memory_gib": train[-1].get("peak_memory_gib"),
            "first_step_s": float(first[1]) if (first := FIRST_STEP.search(done.stdout)) else None,
            "wall_s": done.wall_s, "header": next(iter(done.stdout.splitlines()), "")}
