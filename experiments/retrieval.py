"""Passkey retrieval of NSA and full attention trained alike, on a (context length x needle depth)
grid from the trained length up to 4x beyond it, with NSA's selection hit rate per layer.

Three stages, each a re-runnable command (a training run that is cut off resumes):

    python experiments/retrieval.py train --config CONFIG --out OUT [--chunk-minutes 9] [overrides]
    python experiments/retrieval.py eval --out OUT [--lengths L ...] [--depths D ...]
                                         [--examples 100] [--batch-size 8] [--seed 0]
    python experiments/retrieval.py report --out OUT

`train` advances CONFIG as NSA (OUT/nsa) and as its full-attention twin (OUT/full, the same config
with model.attention=full: identical data, seed, steps and optimizer) by at most --chunk-minutes
each; SIGTERM makes the trainer save and stop, and running the command again continues. Extra
arguments are nsa-train config overrides, applied to both. `eval` restores both runs' newest
checkpoints and measures passkey exact-match accuracy (and the share of key digits right, each
given the true ones before it) on the same examples per grid cell (default
lengths: the trained seq_len times 1, 2, 3, 4; depths 0, .25, .5, .75, 1) and, for NSA, the
selection hit rate per layer (nsa_jax/eval/selection.py says what a hit and a forced hit are),
from one jitted logits-and-indices forward per batch -> OUT/retrieval.json. `report` turns that
into OUT/retrieval.png (heat maps and hit rates) and OUT/report.md (tables).

On a CPU (docs/results.md has the results): CONFIG = configs/retrieval_tiny.py,
OUT = runs/retrieval_tiny. The experiment the configs are sized for (one GPU; 8k trained, grid up
to 32k; not run yet):
    python experiments/retrieval.py train --config configs/small_nsa.py --out runs/retrieval
    python experiments/retrieval.py eval --out runs/retrieval --batch-size 4
    python experiments/retrieval.py report --out runs/retrieval
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

from experiments.retrieval_report import report  # noqa: E402
from experiments.runs import train_in_chunks  # noqa: E402
from nsa_jax.data import (PASSKEY_DIGITS, answer_hits, answer_token_hits,  # noqa: E402
                          padded_batches, passkey_min_length)
from nsa_jax.eval import parse_eval_args, passkey_cell, selection_hits  # noqa: E402
from nsa_jax.train import load_trained_run, resolve  # noqa: E402

KINDS = ("nsa", "full")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LENGTH_FACTORS = (1, 2, 3, 4)


def train(config: pathlib.Path, out: pathlib.Path, overrides: list[str], minutes: float) -> None:
    if not config.is_file():
        raise FileNotFoundError(f"config file {config} not found; expected e.g. "
                                "configs/retrieval_tiny.py")
    train_in_chunks({kind: (config, out / kind, [*overrides, f"--config.model.attention={kind}"])
                     for kind in KINDS}, minutes)


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


def load_settings(out: pathlib.Path, kind: str):
    """The resolved settings of the run in OUT/kind, as stored by nsa-train."""
    workdir = out / kind
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"no {kind} run in {workdir} (no config.json): train first with "
                                f"`python experiments/retrieval.py train --config CONFIG --out "
                                f"{out}`")
    return resolve(parse_eval_args(["--workdir", str(workdir)])[0])


def restore(run, workdir: pathlib.Path):
    """-> (graphdef, model state, step) of the newest checkpoint in `workdir`."""
    _, graphdef, state, step = load_trained_run(workdir, run)
    if step < run.train.steps:
        print(f"warning: {workdir} is at step {step} of {run.train.steps}; run train again to "
              "finish it", flush=True)
    return graphdef, state, step


def check_twins(nsa_run, full_run) -> None:
    """The comparison is only fair if the runs differ in model.attention alone."""
    same_model = dataclasses.replace(full_run.model, attention="nsa") == nsa_run.model
    if nsa_run.model.attention != "nsa" or full_run.model.attention != "full" or not same_model:
        raise ValueError("OUT/nsa and OUT/full must be one config trained with model.attention "
                         f"nsa and full, got {nsa_run.model} and {full_run.model}")
    for section in ("train", "data", "optimizer"):
        if getattr(nsa_run, section) != getattr(full_run, section):
            raise ValueError(f"OUT/nsa and OUT/full differ in their {section} settings: "
                             f"{getattr(nsa_run, section)} vs {getattr(full_run, section)}")


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


def evaluate(out: pathlib.Path, lengths, depths, examples: int, batch_size: int,
             seed: int) -> dict:
    runs = {kind: load_settings(out, kind) for kind in KINDS}
    check_twins(runs["nsa"], runs["full"])
    trained = runs["nsa"].data.seq_len
    lengths = list(lengths or [trained * f for f in LENGTH_FACTORS])
    depths = list(DEPTHS if depths is None else depths)
    check_grid(lengths, depths, examples, batch_size)
    result = {"trained_length": trained, "lengths": lengths, "depths": depths,
              "examples": examples, "batch_size": batch_size, "seed": seed}
    for kind, run in runs.items():
        graphdef, state, step = restore(run, out / kind)
        start = time.perf_counter()
        nsa_cfg = run.model.nsa if kind == "nsa" else None
        grid = evaluate_grid(make_forward(graphdef), state, lengths, depths, examples,
                             batch_size, seed, nsa_cfg)
        result[kind] = {"config": run.train.name, "step": step, "planned_steps": run.train.steps,
                        "model": dataclasses.asdict(run.model),
                        "eval_seconds": round(time.perf_counter() - start, 1), **grid}
        for name in ("accuracy", "digit_accuracy"):
            print(f"{kind} (step {step}) passkey {name}, rows lengths {lengths}, columns depths "
                  f"{depths}:\n{np.array2string(np.array(grid[name]), precision=3)}", flush=True)
        if nsa_cfg is not None:
            print(f"selection per layer: {grid['selection']['per_layer']}", flush=True)
    path = out / "retrieval.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("train", "eval", "report"))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "retrieval")
    parser.add_argument("--config", type=pathlib.Path, help="train: the NSA config file")
    parser.add_argument("--chunk-minutes", type=float, default=9.0)
    parser.add_argument("--lengths", type=int, nargs="+", help="eval: default seq_len x 1..4")
    parser.add_argument("--depths", type=float, nargs="+", help=f"eval: default {DEPTHS}")
    parser.add_argument("--examples", type=int, default=100, help="eval: examples per cell")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="eval: seed of the examples")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.stage != "train":
        parser.error(f"unexpected arguments {overrides} (config overrides are for train only)")
    if args.stage == "train" and args.config is None:
        parser.error("train needs --config CONFIG (e.g. configs/retrieval_tiny.py)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if args.stage == "train":
            args.out.mkdir(parents=True, exist_ok=True)
            train(args.config, args.out, overrides, args.chunk_minutes)
        elif args.stage == "eval":
            evaluate(args.out, args.lengths, args.depths, args.examples, args.batch_size,
                     args.seed)
        else:
            report(args.out)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"retrieval.py {args.stage}: error: {error}")


if __name__ == "__main__":
    main()
