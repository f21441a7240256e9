"""The OUT/<config>/seed<k>/retrieval.json files of experiments/retrieval.py eval ->
OUT/retrieval.png and OUT/report.md: every config (arm) with its seeds aggregated (mean, spread
and each seed), in the form docs/results.md takes, with the runs' configs, commands, device,
dates and commit."""
from __future__ import annotations

import json
import pathlib
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.provenance import provenance_lines  # noqa: E402
from experiments.runs import study_workdirs  # noqa: E402
from experiments.seeds import band, spread  # noqa: E402

CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
GRID_KEYS = ("trained_length", "lengths", "depths", "examples", "eval_seed")
METRICS = {"accuracy": "Passkey exact match",
           "digit_accuracy": "Key digits right (each given the true digits before it)"}
SHORT = {"accuracy": "exact match", "digit_accuracy": "key digits right"}


def load_results(out: pathlib.Path) -> dict[str, dict[int, dict]]:
    """{arm: {seed: retrieval.json}} of the evaluated runs in OUT, all on one grid."""
    results = {}
    for arm, seeds in study_workdirs(out).items():
        for seed, workdir in seeds.items():
            if (workdir / "retrieval.json").exists():
                results.setdefault(arm, {})[seed] = json.loads(
                    (workdir / "retrieval.json").read_text())
    if not results:
        raise FileNotFoundError(f"no OUT/<config>/seed<k>/retrieval.json in {out}: run `python "
                                f"experiments/retrieval.py eval --out {out}` first")
    grids = {tuple(json.dumps(r[k]) for k in GRID_KEYS): f"{arm}/seed{seed}"
             for arm, seeds in results.items() for seed, r in seeds.items()}
    if len(grids) > 1:
        raise ValueError(f"the runs in {out} were evaluated on different grids "
                         f"({', '.join(grids.values())} differ in {GRID_KEYS}); run eval again "
                         "with one grid for all")
    return results


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _grid(results: dict) -> dict:
    return next(iter(next(iter(results.values())).values()))


def _length_label(length: int, trained: int) -> str:
    return f"{length} ({length / trained:.3g}x)"


def summary_table(results: dict, metric: str) -> list[str]:
    """Arms x lengths: the metric averaged over depths, then over seeds (± std, each seed)."""
    grid = _grid(results)
    header = ["config", "parameters", "seeds", "step"] + [
        _length_label(n, grid["trained_length"]) for n in grid["lengths"]]
    rows = []
    for arm, seeds in results.items():
        by_length = np.array([np.mean(r[metric], axis=1) for r in seeds.values()])  # [S, L]
        steps = sorted({r["step"] for r in seeds.values()})
        rows.append([arm, f"{next(iter(seeds.values()))['params'] / 1e6:.3f}M",
                     ", ".join(map(str, seeds)), ", ".join(map(str, steps))] +
                    [spread(column) for column in by_length.T])
    return [f"{METRICS[metric]} by context length, mean over the {len(grid['depths'])} depths "
            f"({grid['examples']} examples per cell); mean ± std over seeds (each seed):", "",
            *_table(header, rows)]


def arm_table(results: dict, arm: str, metric: str) -> list[str]:
    """Lengths x depths of one arm, mean over its seeds."""
    grid, seeds = _grid(results), results[arm]
    mean = np.mean([r[metric] for r in seeds.values()], axis=0)
    header = ["context length"] + [f"depth {d:g}" for d in grid["depths"]] + ["mean"]
    rows = [[_length_label(n, grid["trained_length"])] + [_cell(a) for a in row] +
            [_cell(np.mean(row))] for n, row in zip(grid["lengths"], mean)]
    return [f"{METRICS[metric]}, {arm}, mean over seeds {', '.join(map(str, seeds))}:", "",
            *_table(header, rows)]


def _hit_rates_by_length(selection: dict) -> list[list]:
    """[layers][lengths + 1] non-forced hit rate, depths pooled; the last column pools all."""
    free = np.array(selection["unforced_hits"]).sum(2)  # [layers, lengths]
    total = (selection["queries"] - np.array(selection["forced"])).sum(1)  # [lengths]
    rates = [[None if t == 0 else h / t for h, t in zip(row, total)] for row in free]
    return [row + [rate] for row, rate in zip(rates, selection["per_layer"]["unforced_hit_rate"])]


def selection_tables(results: dict, arm: str) -> list[str]:
    """NSA's hit rate per layer and length over seeds, and where hits are forced."""
    grid, seeds = _grid(results), results[arm]
    rates = np.array([_hit_rates_by_length(r["selection"]) for r in seeds.values()],
                     dtype=object)  # [S, layers, lengths + 1]
    lengths = [_length_label(n, grid["trained_length"]) for n in grid["lengths"]]
    rows = [[str(layer)] + [spread(rates[:, layer, j]) for j in range(rates.shape[2])]
            for layer in range(rates.shape[1])]
    first = next(iter(seeds.values()))["selection"]
    forced = [[_length_label(n, grid["trained_length"])] + [_cell(f) for f in row]
              for n, row in zip(grid["lengths"], first["forced_fraction"])]
    return [f"{arm}: selection hit rate of non-forced queries per layer (a hit: every selection "
            "block holding a key digit is among the query's selected blocks, per query predicting "
            "a key digit and KV head; depths pooled); mean ± std over seeds (each seed):", "",
            *_table(["layer"] + lengths + ["all"], rows), "",
            f"{arm}: share of the queries whose hit is forced (the key's blocks are always "
            "selected: the first num_init_blocks, the num_local_blocks ending at the query's "
            "block, "
            f"or every block when the query sees at most num_selected); "
            f"{first['per_layer']['forced_cells']} of {first['per_layer']['cells']} cells are "
            "entirely forced and say nothing about learned selection:", "",
            *_table(["context length"] + [f"depth {d:g}" for d in grid["depths"]], forced)]


def _heat_map(ax, values, columns, rows, title: str):
    shown = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    image = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap=CMAP, aspect="auto", origin="lower")
    ax.set(xticks=range(len(columns)), xticklabels=columns, yticks=range(len(rows)),
           yticklabels=rows, xlabel="needle depth (0 = start, 1 = end)",
           ylabel="context length (tokens)", title=title)
    for i, row in enumerate(shown):
        for j, value in enumerate(row):
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                    color="white" if value < 0.5 else "black")
    return image


def plot(results: dict, path: pathlib.Path) -> None:
    grid = _grid(results)
    factors = [n / grid["trained_length"] for n in grid["lengths"]]
    columns = max(3, len(results))
    fig, axes = plt.subplots(2, columns, figsize=(5.6 * columns, 9.6), layout="constrained")
    colors = {arm: f"C{i}" for i, arm in enumerate(results)}  # one color per arm in every panel
    for ax, metric in zip(axes[0], METRICS):
        for arm, seeds in results.items():
            band(ax, factors, [np.mean(r[metric], axis=1) for r in seeds.values()], arm,
                 colors[arm])
        ax.set(title=f"{SHORT[metric]}, mean over depths (band: seeds' range)", ylim=(-0.02, 1.02),
               xscale="log", xticks=factors, xticklabels=[f"{f:g}x" for f in factors],
               xlabel="context length / trained length", ylabel=SHORT[metric])
    for arm, seeds in results.items():
        if all("selection" in r for r in seeds.values()):
            per_seed = [np.nanmean(np.array(_hit_rates_by_length(r["selection"]), dtype=float)
                                   [:, :-1], axis=0) for r in seeds.values()]
            band(axes[0, 2], factors, per_seed, arm, colors[arm])
    axes[0, 2].set(title="NSA selection hit rate, non-forced queries, mean over layers",
                   ylim=(-0.02, 1.02), xscale="log", xticks=factors,
                   xticklabels=[f"{f:g}x" for f in factors], xlabel="context length / trained "
                   "length", ylabel="hit rate")
    for ax in axes[0, :3]:
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    for ax in axes[0, 3:]:
        ax.axis("off")
    for ax, (arm, seeds) in zip(axes[1], results.items()):
        image = _heat_map(ax, np.mean([r["accuracy"] for r in seeds.values()], axis=0),
                          [f"{d:g}" for d in grid["depths"]],
                          [_length_label(n, grid["trained_length"]) for n in grid["lengths"]],
                          f"{arm}: exact match (mean of {len(seeds)} seed(s))")
    for ax in axes[1, len(results):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes[1], shrink=0.6)
    fig.suptitle(f"passkey retrieval, trained at {grid['trained_length']} tokens "
                 f"({grid['examples']} examples per cell)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: pathlib.Path) -> None:
    results = load_results(out)
    png, markdown = out / "retrieval.png", out / "report.md"
    plot(results, png)
    workdirs = {arm: {s: w for s, w in seeds.items() if s in results.get(arm, {})}
                for arm, seeds in study_workdirs(out).items() if arm in results}
    lines = [*provenance_lines(out, workdirs), ""]
    for metric in METRICS:
        lines += [*summary_table(results, metric), ""]
    for arm in results:
        for metric in METRICS:
            lines += [*arm_table(results, arm, metric), ""]
        if all("selection" in r for r in results[arm].values()):
            lines += [*selection_tables(results, arm), ""]
    markdown.write_text("\n".join(lines))
    print("\n".join(lines), f"wrote {png} and {markdown}", sep="\n")
