"""metrics.jsonl (one JSON object per line) and the loss-curve PNG drawn from it.

Training lines hold step, loss, grad_norm, learning_rate, tokens_per_s and, for NSA models,
gate_cmp / gate_slc / gate_win (mean gate per branch over layers, batch, tokens and heads).
Evaluation lines hold step, val_loss, val_perplexity and val_loss/<corpus>.
"""
from __future__ import annotations

import json
import math
import pathlib


class MetricsLog:
    """Appends metric objects to WORKDIR/metrics.jsonl."""

    def __init__(self, workdir):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"

    def truncate_after(self, step: int) -> None:
        """Keep only lines up to `step` (a resumed run logs the later steps again); a line cut
        short by a kill is dropped."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if _parse(line) is not None and _parse(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [r for r in map(_parse, self.path.read_text().splitlines()) if r is not None]


def _parse(line: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def plot_losses(records: list[dict], path, title: str) -> None:
    """Train loss and validation loss against step, log-scaled loss axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("loss", "train", "-"), ("val_loss", "validation", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set(xlabel="step", ylabel="loss (nats / byte)", title=title, yscale="log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
