"""Language modelling, NSA vs full attention trained from scratch on identical data, steps and
optimizer, over several seeds: validation loss with a band over seeds, and training throughput.

Three stages, each a re-runnable command (a run that is cut off resumes from its checkpoint):

    python experiments/nsa_vs_full.py train [--out OUT] [--configs A B ...] [--seeds 0 1 2]
                                            [--minutes 9] [--gpus 1] [--config.key=value ...]
    python experiments/nsa_vs_full.py speed32k [--out OUT] [--steps 20]
    python experiments/nsa_vs_full.py report [--out OUT]

`train` trains every config (default configs/lm_8k_nsa.py and its matched full-attention twin
configs/lm_8k_full.py) with every seed in OUT/<config stem>/seed<k> until --minutes are spent (one
run at a time, or one per GPU with --gpus N; experiments/runs.py), seed by seed; run it again to
continue. Extra arguments are nsa-train overrides, applied to every run. `speed32k` trains
configs/long_32k.py with NSA and with full attention for a few steps each and keeps tokens/s,
step time and peak GPU memory. `report` writes OUT/val_loss.png (validation loss per config: mean
over seeds, the seeds' range as a band) and OUT/report.md (validation loss at every evaluation and
at the end over seeds, training tokens/s, peak memory, and the runs' configs, commands, device,
dates and commit) from the runs' metrics.jsonl.

Issue 21's language-modelling study (one H200; configs/lm_8k_nsa.py states the budget):
    python experiments/nsa_vs_full.py train --out runs/lm_8k --minutes 9     # repeat until done
    python experiments/nsa_vs_full.py report --out runs/lm_8k
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

from experiments.provenance import provenance_lines, record_command  # noqa: E402
from experiments.runs import study_runs, study_workdirs, train_chunk, train_within  # noqa: E402
from experiments.seeds import band, spread  # noqa: E402
from nsa_jax.models import num_params  # noqa: E402
from nsa_jax.train import resolve  # noqa: E402

CONFIGS = (ROOT / "configs" / "lm_8k_nsa.py", ROOT / "configs" / "lm_8k_full.py")


def _records(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _val_losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in _records(workdir) if "val_loss" in r}


def train(configs, seeds, out: pathlib.Path, overrides: list[str], minutes: float, gpus: int,
          command: list[str]) -> None:
    runs = study_runs(configs, seeds, out, overrides)
    record_command(out, "nsa_vs_full.py", command)
    train_within(runs, minutes, gpus)


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
    config = json.loads((workdir / "config.json").read_text())
    train = [r for r in records if "tokens_per_s" in r][1:]  # the first window includes compilation
    evals = [r for r in records if "val_loss" in r]
    peaks = [r["peak_memory_gib"] for r in records if "peak_memory_gib" in r]
    return {"step": max((r["step"] for r in records), default=0),
            "batch_tokens": config["data"]["batch_size"] * config["data"]["seq_len"],
            "val_loss": evals[-1]["val_loss"] if evals else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train) if train else None,
            "peak_memory_gib": max(peaks) if peaks else None}


def _common_steps(seeds: dict) -> list[int]:
    """Evaluation steps every seed of an arm has reached."""
    steps = [set(_val_losses(w)) for w in seeds.values()]
    return sorted(set.intersection(*steps)) if steps else []


def plot(workdirs: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm, seeds in workdirs.items():
        steps = _common_steps(seeds)
        band(ax, steps, [[_val_losses(w)[s] for s in steps] for w in seeds.values()],
             f"{arm} ({len(seeds)} seed(s))")
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)",
           title="NSA vs full attention: mean over seeds, band = seeds' range")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_lines(out: pathlib.Path, workdirs: dict) -> list[str]:
    rows, by_step = [], {}
    for arm, seeds in workdirs.items():
        summaries = [_summary(w) for w in seeds.values()]
        speeds = [s["tokens_per_s"] for s in summaries if s["tokens_per_s"] is not None]
        peaks = [s["peak_memory_gib"] for s in summaries if s["peak_memory_gib"] is not None]
        model = resolve(json.loads((next(iter(seeds.values())) / "config.json").read_text())).model
        rows.append(f"| {arm} | {model.attention} | {num_params(model) / 1e6:.2f}M | "
                    f"{', '.join(map(str, seeds))} | "
                    f"{', '.join(str(s['step']) for s in summaries)} | "
                    f"{spread([s['val_loss'] for s in summaries], 4)} | "
                    f"{_cell(statistics.median(speeds) if speeds else None, ',.0f')} | "
                    f"{_cell(max(peaks) if peaks else None, '.1f')} |")
        for step in _common_steps(seeds):
            by_step.setdefault(step, {})[arm] = spread(
                [_val_losses(w)[step] for w in seeds.values()], 4)
    arms = list(workdirs)
    return [*provenance_lines(out, workdirs), "",
            "| config | attention | parameters | seeds | steps | final validation loss "
            "(nats/byte), mean ± std (each seed) | train tokens/s (median) | peak GPU memory "
            "(GiB) |", "|---|---|---|---|---|---|---|---|", *rows, "",
            "Validation loss at each evaluation every seed has reached, mean ± std (each seed):",
            "", "| step | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms),
            *(f"| {step} | " + " | ".join(cells.get(arm, "-") for arm in arms) + " |"
              for step, cells in sorted(by_step.items()))]


def _speed_lines(out: pathlib.Path) -> list[str]:
    rows = {kind: _summary(out / f"32k_{kind}") for kind in ("nsa", "full")
            if (out / f"32k_{kind}" / "metrics.jsonl").exists()}
    if not rows:
        return []
    lines = ["", "| 32k speed run | steps | train tokens/s | step time (s) | peak GPU memory "
             "(GiB) |", "|---|---|---|---|---|"]
    for kind, s in rows.items():
        step_time = None if s["tokens_per_s"] is None else s["batch_tokens"] / s["tokens_per_s"]
        lines.append(f"| {kind} | {s['step']} | {_cell(s['tokens_per_s'], ',.0f')} | "
                     f"{_cell(step_time, '.3f')} | {_cell(s['peak_memory_gib'], '.1f')} |")
    if len(rows) == 2 and None not in (rows["nsa"]["tokens_per_s"], rows["full"]["tokens_per_s"]):
        lines.append(f"\nNSA / full training throughput at 32k: "
                     f"{rows['nsa']['tokens_per_s'] / rows['full']['tokens_per_s']:.2f}x")
    return lines


def report(out: pathlib.Path) -> None:
    workdirs = study_workdirs(out)
    if not workdirs:
        raise FileNotFoundError(f"no runs in {out} (no OUT/<config>/seed<k>/config.json): run "
                                f"`python experiments/nsa_vs_full.py train --out {out}` first")
    plot(workdirs, out / "val_loss.png")
    lines = report_lines(out, workdirs) + _speed_lines(out)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), f"\nwrote {out / 'val_loss.png'} and {out / 'report.md'}", sep="\n")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("train", "speed32k", "report"))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "lm_8k")
    parser.add_argument("--configs", type=pathlib.Path, nargs="+", default=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=9.0, help="train: stop after this many")
    parser.add_argument("--gpus", type=int, default=1, help="train: runs side by side, one per GPU")
    parser.add_argument("--steps", type=int, default=20, help="speed32k: steps per model")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.stage == "report":
        parser.error(f"unexpected arguments {overrides} (config overrides are for train and "
                     "speed32k)")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if args.stage == "train":
            train(args.configs, args.seeds, args.out, overrides, args.minutes, args.gpus, argv)
        elif args.stage == "speed32k":
            speed32k(args.out, overrides, args.steps)
        else:
            report(args.out)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"nsa_vs_full.py {args.stage}: error: {error}")


if __name__ == "__main__":
    main()
