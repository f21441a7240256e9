"""Passkey retrieval study: models trained alike from several config files (NSA, its matched
full-attention twin, ablations) and seeds, measured on a (context length x needle depth) grid from
the trained length up to 8x beyond it, with NSA's selection hit rate per layer.

Three stages, each a re-runnable command that resumes where the last one stopped:

    python experiments/retrieval.py train --out OUT --configs CONFIG [CONFIG ...] [--seeds 0 1 2]
                                          [--minutes 9] [--gpus 1] [--config.key=value ...]
    python experiments/retrieval.py eval --out OUT [--minutes 9] [--lengths L ...] [--depths D ...]
                                         [--examples 100] [--batch-size 8] [--seed 0]
    python experiments/retrieval.py report --out OUT

`train` trains every CONFIG with every seed in OUT/<config stem>/seed<k> (experiments/runs.py):
the unfinished runs in order, seed by seed, until --minutes are spent (SIGTERM makes the trainer
save and stop), one at a time, or side by side with --gpus N (one run per GPU). The configs must
train on identical data with identical optimizer and steps; only their models may differ. Extra
arguments are nsa-train overrides, applied to every run. `eval` takes each finished run not yet
evaluated on this grid, restores its final checkpoint and measures passkey exact match and the
share of key digits right (each given the true ones before it) on the same examples per cell
(default lengths: the trained seq_len times 1, 2, 4, 8; depths 0, .25, .5, .75, 1) and, for NSA,
the selection hit rate per layer (nsa_jax/eval/selection.py says what a hit and a forced hit
are), from one jitted logits-and-indices forward per batch -> OUT/<config>/seed<k>/retrieval.json;
it starts no new run's grid after --minutes. `report` aggregates the seeds ->
OUT/retrieval.png and OUT/report.md (tables with their configs, commands, device, dates, commit).

Issue 21's study (one H200; `python experiments/budget.py CONFIG` estimates each config's time):
    python experiments/retrieval.py train --out runs/retrieval_4k --seeds 0 1 2 --minutes 9 \\
        --configs configs/retrieval_4k_nsa.py configs/retrieval_4k_full.py \\
                  configs/retrieval_4k_gates_half.py
    python experiments/retrieval.py eval --out runs/retrieval_4k --minutes 7
    python experiments/retrieval.py report --out runs/retrieval_4k
each repeated until it says everything is done. On a CPU: configs/retrieval_tiny.py and
configs/retrieval_tiny_full.py, --seeds 0 (docs/results.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.provenance import record_command  # noqa: E402
from experiments.retrieval_report import report  # noqa: E402
from experiments.runs import (check_comparable, is_finished, study_runs,  # noqa: E402
                             study_workdirs, train_within)
from nsa_jax.data import (PASSKEY_DIGITS, answer_hits, answer_token_hits,  # noqa: E402
                          padded_batches, passkey_min_length)
from nsa_jax.eval import parse_eval_args, passkey_cell, selection_hits  # noqa: E402
from nsa_jax.models import num_params  # noqa: E402
from nsa_jax.train import load_trained_run, resolve  # noqa: E402

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LENGTH_FACTORS = (1, 2, 4, 8)
EXAMPLES = 100  # per grid cell
RESULT = "retrieval.json"


def train(configs, seeds, out: pathlib.Path, overrides: list[str], minutes: float,
          gpus: int, command: list[str]) -> None:
    runs = study_runs(configs, seeds, out, overrides)
    record_command(out, "retrieval.py", command)
    train_within(runs, minutes, gpus)


def check_grid(lengths, depths, examples: int, batch_size: int) -> None:
    """ValueError naming the first bad grid setting and what it must be."""
    minimum = passkey_min_length(PASSKEY_DIGITS)
    if not lengths or any(length < minimum for length in lengths):
        raise ValueError(f"--lengths must be context lengths >= {minimum} (the shortest "
                         f"{PASSKEY_DIGITS}-digit passkey example), got {list(lengths)}")
    if not depths or any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise ValueError(f"--depths must be needle depths in [0, 1] (0 = start, 1 = end), got "
                         f"{list(depths)}")
    for name, value in (("--examples", examples), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def load_settings(workdir: pathlib.Path):
    """The resolved settings of the run in `workdir`, as stored by nsa-train."""
    return resolve(parse_eval_args(["--workdir", str(workdir)])[0])


def make_forward(graphdef):
    """Jitted (state, tokens, segment_ids) -> (logits, NSA indices [layers, B, T, Hkv, n] or
    None for dense attention): one pass gives both."""
    def forward(state, tokens, segment_ids):
        model = nnx.merge(graphdef, state)
        logits, aux = model(tokens, segment_ids=segment_ids, return_aux=True)
        return logits, aux.get("indices")

    return jax.jit(forward)


def evaluate_cell(forward, state, examples, batch_size: int, nsa_cfg=None):
    """-> (exact-match accuracy, key-digit accuracy, hits [layers, N] bool, forced [N] bool) over
    `examples`; hits and forced are None without nsa_cfg (dense attention)."""
    answers, digits, hits, forced = [], [], [], []
    for chunk, batch in padded_batches(examples, batch_size):
        logits, indices = forward(state, batch["tokens"], batch["segment_ids"])
        logits = np.asarray(logits)
        answers.append(answer_hits(logits, chunk))
        digits += answer_token_hits(logits, chunk)
        if nsa_cfg is not None:
            cell_hits, cell_forced = selection_hits(np.asarray(indices), chunk, nsa_cfg)
            hits.append(cell_hits)
            forced.append(cell_forced)
    accuracy = (float(np.concatenate(answers).mean()), float(np.concatenate(digits).mean()))
    if nsa_cfg is None:
        return *accuracy, None, None
    return *accuracy, np.concatenate(hits, axis=1), np.concatenate(forced)


def _rates(counts, totals) -> list:
    """counts / totals elementwise as nested lists, None where the total is 0."""
    counts = np.asarray(counts, dtype=float)
    totals = np.broadcast_to(totals, counts.shape)
    return np.where(totals > 0, counts / np.maximum(totals, 1), None).tolist()


def selection_summary(hits: np.ndarray, forced: np.ndarray) -> dict:
    """hits [layers, lengths, depths, N] bool, forced [lengths, depths, N] bool -> counts and rates
    per cell (and per layer), and the same over the whole grid in "per_layer"."""
    free = ~forced
    unforced_hits, unforced = (hits & free).sum(-1), free.sum(-1)
    return {"queries": forced.shape[-1], "forced": forced.sum(-1).tolist(),
            "hits": hits.sum(-1).tolist(), "unforced_hits": unforced_hits.tolist(),
            "hit_rate": hits.mean(-1).tolist(),
            "unforced_hit_rate": _rates(unforced_hits, unforced),
            "forced_fraction": forced.mean(-1).tolist(),
            "per_layer": {"hit_rate": hits.mean((1, 2, 3)).tolist(),
                          "unforced_hit_rate": _rates(unforced_hits.sum((1, 2)), unforced.sum()),
                          "forced_fraction": float(forced.mean()),
                          "forced_cells": int(forced.all(-1).sum()),
                          "cells": int(forced[..., 0].size)}}


def evaluate_grid(forward, state, lengths, depths, examples: int, batch_size: int, seed: int,
                  nsa_cfg=None) -> dict:
    """Exact-match and key-digit accuracy [lengths][depths] and, with nsa_cfg, the selection
    summary of one model."""
    accuracy, digits = np.zeros((2, len(lengths), len(depths)))
    hits, forced = [], []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            cell = passkey_cell(length, depth, examples, seed)
            accuracy[i, j], digits[i, j], cell_hits, cell_forced = evaluate_cell(
                forward, state, cell, batch_size, nsa_cfg)
            hits.append(cell_hits)
            forced.append(cell_forced)
    result = {"accuracy": accuracy.tolist(), "digit_accuracy": digits.tolist()}
    if nsa_cfg is not None:
        grid = (len(lengths), len(depths))
        stacked = np.stack(hits, axis=1)  # [layers, cells, N]
        result["selection"] = selection_summary(stacked.reshape(stacked.shape[0], *grid, -1),
                                                np.stack(forced).reshape(*grid, -1))
    return result


def evaluate_run(workdir: pathlib.Path, run, grid: dict) -> dict:
    """The grid (lengths, depths, examples, batch_size, eval_seed) on the newest checkpoint of the
    run in `workdir` -> its retrieval.json content."""
    _, graphdef, state, step = load_trained_run(workdir, run)
    start = time.perf_counter()
    nsa_cfg = run.model.nsa if run.model.attention == "nsa" else None
    measured = evaluate_grid(make_forward(graphdef), state, grid["lengths"], grid["depths"],
                             grid["examples"], grid["batch_size"], grid["eval_seed"], nsa_cfg)
    return {"arm": workdir.parent.name, "seed": run.train.seed, "config": run.train.name,
            "step": step, "planned_steps": run.train.steps, "params": num_params(run.model),
            "model": dataclasses.asdict(run.model), "trained_length": run.data.seq_len, **grid,
            "eval_seconds": round(time.perf_counter() - start, 1), **measured}


def _is_current(path: pathlib.Path, run, grid: dict) -> bool:
    """retrieval.json exists for this grid and the run's final step."""
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    return result["step"] == run.train.steps and all(result[k] == v for k, v in grid.items())


def evaluate(out: pathlib.Path, lengths, depths, examples: int, batch_size: int, seed: int,
             minutes: float, command: list[str]) -> None:
    workdirs = study_workdirs(out)
    if not workdirs:
        raise FileNotFoundError(f"no runs in {out} (no OUT/<config>/seed<k>/config.json): train "
                                f"first with `python experiments/retrieval.py train --out {out} "
                                "--configs ...`")
    runs = {(arm, s): load_settings(w) for arm, seeds in workdirs.items() for s, w in seeds.items()}
    check_comparable(runs)
    trained = next(iter(runs.values())).data.seq_len
    grid = {"lengths": list(lengths or [trained * f for f in LENGTH_FACTORS]),
            "depths": list(DEPTHS if depths is None else depths), "examples": examples,
            "batch_size": batch_size, "eval_seed": seed}
    check_grid(grid["lengths"], grid["depths"], examples, batch_size)
    record_command(out, "retrieval.py", command)
    deadline, waiting = time.monotonic() + minutes * 60, []
    for (arm, s), run in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0])):
        workdir = workdirs[arm][s]
        path = workdir / RESULT
        if _is_current(path, run, grid):
            continue
        if not is_finished(workdir, run.train.steps):
            waiting.append(f"{arm}/seed{s} (training not finished)")
            continue
        if time.monotonic() > deadline:
            waiting.append(f"{arm}/seed{s} (out of time)")
            continue
        result = evaluate_run(workdir, run, grid)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{arm}/seed{s} (step {result['step']}, {result['eval_seconds']} s): exact match "
              f"by length {np.mean(result['accuracy'], axis=1).round(3).tolist()}, key digits "
              f"{np.mean(result['digit_accuracy'], axis=1).round(3).tolist()}; wrote {path}",
              flush=True)
    print("every run is evaluated" if not waiting else
          f"not evaluated yet: {', '.join(waiting)}; run the same command again", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("train", "eval", "report"))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "retrieval")
    parser.add_argument("--configs", type=pathlib.Path, nargs="+", help="train: config files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train: seeds")
    parser.add_argument("--minutes", type=float, default=9.0,
                        help="train: stop after this many minutes; eval: start no new run after")
    parser.add_argument("--gpus", type=int, default=1, help="train: runs side by side, one per GPU")
    parser.add_argument("--lengths", type=int, nargs="+", help="eval: default seq_len x 1, 2, 4, 8")
    parser.add_argument("--depths", type=float, nargs="+", help=f"eval: default {DEPTHS}")
    parser.add_argument("--examples", type=int, default=EXAMPLES, help="eval: examples per cell")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="eval: seed of the examples")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.stage != "train":
        parser.error(f"unexpected arguments {overrides} (config overrides are for train only)")
    if args.stage == "train" and not args.configs:
        parser.error("train needs --configs CONFIG [CONFIG ...] (e.g. configs/retrieval_tiny.py "
                     "configs/retrieval_tiny_full.py)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if args.stage == "train":
            train(args.configs, args.seeds, args.out, overrides, args.minutes, args.gpus, argv)
        elif args.stage == "eval":
            evaluate(args.out, args.lengths, args.depths, args.examples, args.batch_size,
                     args.seed, args.minutes, argv)
        else:
            report(args.out)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"retrieval.py {args.stage}: error: {error}")


if __name__ == "__main__":
    main()
