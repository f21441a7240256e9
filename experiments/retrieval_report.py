"""OUT/retrieval.json (experiments/retrieval.py eval) -> OUT/retrieval.png and OUT/report.md."""
from __future__ import annotations

import json
import pathlib

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
KINDS = {"nsa": "NSA", "full": "full attention"}


def load_result(out: pathlib.Path) -> dict:
    path = out / "retrieval.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python experiments/retrieval.py eval "
                                f"--out {out}` first")
    return json.loads(path.read_text())


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _length_label(length: int, trained: int) -> str:
    return f"{length} ({length / trained:.3g}x)"


METRICS = {"accuracy": "Passkey exact-match accuracy",
           "digit_accuracy": "Key digits right (each given the true digits before it)"}
SHORT = {"accuracy": "exact match", "digit_accuracy": "key digits right"}


def accuracy_table(result: dict, kind: str, metric: str) -> list[str]:
    run, trained = result[kind], result["trained_length"]
    header = ["context length"] + [f"depth {d:g}" for d in result["depths"]] + ["mean"]
    rows = [[_length_label(length, trained)] + [_cell(a) for a in row] + [_cell(np.mean(row))]
            for length, row in zip(result["lengths"], run[metric])]
    return [f"{METRICS[metric]}, {KINDS[kind]} (checkpoint step {run['step']}, "
            f"{result['examples']} examples per cell):", "", *_table(header, rows)]


def selection_tables(result: dict) -> list[str]:
    selection, trained = result["nsa"]["selection"], result["trained_length"]
    per_layer = selection["per_layer"]
    lines = ["NSA selection hit rate per layer over the whole grid (a hit: every selection block "
             "holding a key digit is among the query's selected blocks, for each query predicting "
             "a key digit and each KV head):", "",
             *_table(["layer", "hit rate, all queries", "hit rate, non-forced queries"],
                     [[str(i), _cell(a), _cell(u)] for i, (a, u) in
                      enumerate(zip(per_layer["hit_rate"], per_layer["unforced_hit_rate"]))]),
             "", f"Forced (the key's blocks are always selected for that query: the first "
             f"num_init_blocks, the num_local_blocks ending at the query's block, or all blocks "
             f"when the query sees at most num_selected): "
             f"{_cell(per_layer['forced_fraction'])} of all (query, KV head) pairs; "
             f"{per_layer['forced_cells']} of {per_layer['cells']} grid cells are entirely forced "
             "and say nothing about learned selection.", "",
             "Forced fraction per cell:", "",
             *_table(["context length"] + [f"depth {d:g}" for d in result["depths"]],
                     [[_length_label(length, trained)] + [_cell(f) for f in row]
                      for length, row in zip(result["lengths"], selection["forced_fraction"])])]
    for layer, (free, every) in enumerate(zip(selection["unforced_hit_rate"],
                                              selection["hit_rate"])):
        rows = [[_length_label(length, trained)] +
                [f"{_cell(u)} ({_cell(a)})" for u, a in zip(free_row, every_row)]
                for length, free_row, every_row in zip(result["lengths"], free, every)]
        lines += ["", f"Layer {layer} hit rate per cell, non-forced queries (all queries in "
                  "brackets; - = every query forced):", "",
                  *_table(["context length"] + [f"depth {d:g}" for d in result["depths"]], rows)]
    return lines


def _heat_map(ax, values, columns, rows, title: str, xlabel: str, ylabel: str):
    """values [rows][columns] in [0, 1] or None (grey, "-": nothing to count)."""
    shown = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    image = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap=CMAP, aspect="auto", origin="lower")
    ax.set(xticks=range(len(columns)), xticklabels=columns, yticks=range(len(rows)),
           yticklabels=rows, xlabel=xlabel, ylabel=ylabel, title=title)
    for i, row in enumerate(shown):
        for j, value in enumerate(row):
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                    color="white" if value < 0.5 else "black")
    return image


def _hit_rates_by_length(selection: dict) -> list[list]:
    """[layers][lengths + 1] non-forced hit rate, depths pooled; the last column pools all."""
    free = np.array(selection["unforced_hits"]).sum(2)  # [layers, lengths]
    total = (selection["queries"] - np.array(selection["forced"])).sum(1)  # [lengths]
    rates = [[None if t == 0 else h / t for h, t in zip(row, total)] for row in free]
    return [row + [rate] for row, rate in zip(rates, selection["per_layer"]["unforced_hit_rate"])]


def plot(result: dict, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.6), layout="constrained")
    lengths = [_length_label(n, result["trained_length"]) for n in result["lengths"]]
    depths = [f"{d:g}" for d in result["depths"]]
    for row, metric in zip(axes, METRICS):
        for ax, kind in zip(row, KINDS):
            image = _heat_map(ax, result[kind][metric], depths, lengths,
                              f"{KINDS[kind]}: {SHORT[metric]}",
                              "needle depth (0 = start, 1 = end)", "context length (tokens)")
        row[1].set(yticklabels=[], ylabel="")  # the same rows as the NSA map beside it
    selection = result["nsa"]["selection"]
    layers = [str(i) for i in range(len(selection["per_layer"]["hit_rate"]))]
    _heat_map(axes[0, 2], _hit_rates_by_length(selection), lengths + ["all"], layers,
              "NSA selection hit rate, non-forced queries", "context length (tokens)", "layer")
    _heat_map(axes[1, 2], selection["forced_fraction"], depths, lengths,
              "NSA: share of queries whose hit is forced", "needle depth (0 = start, 1 = end)",
              "context length (tokens)")
    axes[0, 2].tick_params(axis="x", labelrotation=20)
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.suptitle(f"passkey retrieval, trained at {result['trained_length']} tokens "
                 f"({result['examples']} examples per cell)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: pathlib.Path) -> None:
    result = load_result(out)
    png, markdown = out / "retrieval.png", out / "report.md"
    plot(result, png)
    lines = []
    for metric in METRICS:
        for kind in KINDS:
            lines += [*accuracy_table(result, kind, metric), ""]
    lines += selection_tables(result)
    markdown.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), f"\nwrote {png} and {markdown}", sep="\n")
