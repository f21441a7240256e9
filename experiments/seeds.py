"""Results over seeds, said one way in every report: 'mean ± std (each seed)' in tables, and a mean
line with the seeds' min-max band in plots."""
from __future__ import annotations

import numpy as np


def spread(values, digits: int = 3) -> str:
    """'mean ± sample std (each value)' over seeds; the value alone for one seed; '-' for none
    (None values are left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f} ({each})"


def band(ax, x, per_seed, label: str, color=None) -> None:
    """Mean line over seeds with the seeds' min-max band in the same color; per_seed [S, len(x)],
    None or NaN where a seed has no value."""
    values = np.array(per_seed, dtype=float)
    (line,) = ax.plot(x, np.nanmean(values, axis=0), "o-", label=label, markersize=4, color=color)
    if len(values) > 1:
        ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.25,
                        color=line.get_color())
