"""NSA vs full attention trained from scratch on identical data, seeds and token budgets.

Three stages, each a re-runnable command (a run that is cut off resumes from its checkpoint):

    python experiments/nsa_vs_full.py train  [--chunk-minutes 9] [overrides]   # 8k: both models
    python experiments/nsa_vs_full.py speed32k [--steps 20]                   # 32k: throughput
    python experiments/nsa_vs_full.py report                                   # PNG + table

`train` advances configs/small_nsa.py and configs/small_full.py by at most --chunk-minutes each
(SIGTERM makes the trainer save and stop; run the command again to continue) until both reach
their `steps`. `speed32k` trains configs/long_32k.py with NSA and with full attention for a few
steps each and keeps tokens/s, step time and peak GPU memory. `report` writes
OUT/val_loss.png (both validation curves) and OUT/report.md (final validation loss, training
tokens/s, peak memory) from the runs' metrics.jsonl. Extra arguments are passed to nsa-train as
config overrides (e.g. --config.steps=1000), identically to both models.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.runs import train_chunk, train_in_chunks  # noqa: E402

RUNS_8K = {"nsa": "small_nsa", "full": "small_full"}


def _records(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(out: pathlib.Path, overrides: list[str], minutes: float) -> None:
    train_in_chunks({kind: (ROOT / "configs" / f"{config}.py", out / kind, overrides)
                     for kind, config in RUNS_8K.items()}, minutes)


def speed32k(out: pathlib.Path, overrides: list[str], steps: int) -> None:
    for kind in ("nsa", "full"):
        args = [f"--config.steps={steps}", f"--config.log_every={max(steps // 4, 1)}",
                f"--config.eval_every={steps}", "--config.eval_batches=1",
                f"--config.checkpoint_every={steps}", f"--config.optimizer.warmup_steps={steps // 2}",
                f"--config.model.attention={kind}", *overrides]
        if train_chunk(ROOT / "configs" / "long_32k.py", out / f"32k_{kind}", args, minutes=9) != 0:
            sys.exit(f"32k {kind} run failed")


def _summary(workdir: pathlib.Path) -> dict:
    records = _records(workdir)
    data = json.loads((workdir / "config.json").read_text())["data"]
    train = [r for r in records if "tokens_per_s" in r][1:]  # the first window includes compilation
    evals = [r for r in records if "val_loss" in r]
    peaks = [r["peak_memory_gib"] for r in records if "peak_memory_gib" in r]
    speed = statistics.median(r["tokens_per_s"] for r in train) if train else float("nan")
    return {"step": max((r["step"] for r in records), default=0),
            "batch_tokens": data["batch_size"] * data["seq_len"],
            "val_loss": evals[-1]["val_loss"] if evals else float("nan"),
            "tokens_per_s": speed, "peak_memory_gib": max(peaks) if peaks else float("nan")}


def report(out: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = []
    for kind in RUNS_8K:
        evals = [r for r in _records(out / kind) if "val_loss" in r]
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker="o", label=kind)
        rows.append((f"8k {kind}", _summary(out / kind)))
    for kind in ("nsa", "full"):
        if (out / f"32k_{kind}" / "metrics.jsonl").exists():
            rows.append((f"32k {kind}", _summary(out / f"32k_{kind}")))
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title="NSA vs full attention, 8k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=120)
    lines = ["| run | steps | final val loss | train tokens/s | step time (s) | peak GPU memory (GiB) |",
             "|---|---|---|---|---|---|"]
    tokens = {k: v["tokens_per_s"] for k, v in rows}
    for name, s in rows:
        lines.append(f"| {name} | {s['step']} | {s['val_loss']:.4f} | {s['tokens_per_s']:,.0f} | "
                     f"{s['batch_tokens'] / s['tokens_per_s']:.3f} | {s['peak_memory_gib']:.1f} |")
    for length in ("8k", "32k"):
        if f"{length} nsa" in tokens and f"{length} full" in tokens:
            lines.append(f"\nNSA / full training throughput at {length}: "
                         f"{tokens[f'{length} nsa'] / tokens[f'{length} full']:.2f}x")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), f"\nwrote {out / 'val_loss.png'} and {out / 'report.md'}", sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("train", "speed32k", "report"))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "nsa_vs_full")
    parser.add_argument("--chunk-minutes", type=float, default=9.0)
    parser.add_argument("--steps", type=int, default=20, help="speed32k: steps per model")
    args, overrides = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.stage == "train":
        train(args.out, overrides, args.chunk_minutes)
    elif args.stage == "speed32k":
        speed32k(args.out, overrides, args.steps)
    else:
        report(args.out)


if __name__ == "__main__":
    main()
