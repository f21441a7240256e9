"""What a run shows while it trains: a tqdm bar when stderr is a terminal, and plain log lines
(on stdout, or above the bar) every log_every steps either way. Quiet (the processes of a
multi-process run but the first) shows nothing."""
from __future__ import annotations

import sys

from tqdm import tqdm

from nsa_jax.branches import BRANCHES


class Progress:
    def __init__(self, total: int, initial: int, *, quiet: bool = False):
        self._quiet = quiet
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         disable=quiet or not sys.stderr.isatty())

    def line(self, text: str) -> None:
        if self._quiet:
            return
        if self._bar.disable:
            print(text, flush=True)
        else:
            self._bar.write(text)

    def advance(self, loss: float) -> None:
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def format_train_line(record: dict, steps: int, eta_s: float) -> str:
    gates = " ".join(f"{name} {record['gate_' + name]:.2f}" for name in BRANCHES
                     if "gate_" + name in record)
    return (f"step {record['step']:>{len(str(steps))}}/{steps}  loss {record['loss']:.4f}  "
            f"lr {record['learning_rate']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
            + (f"  gates {gates}" if gates else "") + f"  eta {_duration(eta_s)}")


def format_eval_line(record: dict) -> str:
    corpora = "  ".join(f"{k[9:]} {v:.4f}" for k, v in record.items() if k.startswith("val_loss/"))
    return (f"eval step {record['step']}: val_loss {record['val_loss']:.4f}  "
            f"perplexity {record['val_perplexity']:.2f}  ({corpora}; {record['val_tokens']:,} tokens)")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
