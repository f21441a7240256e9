"""eval.json and eval.png: loss by context length next to the passkey accuracy heat map."""
from __future__ import annotations

import json
import pathlib


def write_report(result: dict, workdir, title: str) -> tuple[pathlib.Path, pathlib.Path]:
    """-> (json path, png path) in workdir."""
    workdir = pathlib.Path(workdir)
    json_path, png_path = workdir / "eval.json", workdir / "eval.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, png_path, title)
    return json_path, png_path


def passkey_title(passkey: dict) -> str:
    """The heat map's title; it says so when the model never trained on passkey examples (the
    grid then shows what an untrained skill scores, typically 0, not a failure of attention)."""
    title = f"passkey accuracy ({passkey['examples']} examples per cell)"
    if not passkey["trained_on_passkeys"]:
        title += "\nthis model never saw passkey data (data.passkey_prob = 0)"
    return title


def _plot(result: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = result["loss_by_length"]
    lengths = [r["length"] for r in rows]
    left.plot(lengths, [r["val_loss"] for r in rows], "o-")
    left.set(xscale="log", xticks=lengths, xticklabels=lengths, xlabel="context length (tokens)", ylabel="validation loss (nats / byte)",
             title="validation loss by context length")
    left.minorticks_off()
    left.grid(True, alpha=0.3)
    passkey = result["passkey"]
    image = right.imshow(passkey["accuracy"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                         origin="lower")
    right.set(xticks=range(len(passkey["depths"])), xticklabels=passkey["depths"],
              yticks=range(len(passkey["lengths"])), yticklabels=passkey["lengths"],
              xlabel="needle depth (0 = start, 1 = end)", ylabel="context length (tokens)",
              title=passkey_title(passkey))
    for i, row in enumerate(passkey["accuracy"]):
        for j, value in enumerate(row):
            right.text(j, i, f"{value:.2f}", ha="center", va="center",
                       color="white" if value < 0.5 else "black")
    fig.colorbar(image, ax=right)
    fig.suptitle(f"{title} (checkpoint step {result['step']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
