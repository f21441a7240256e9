"""How evenly causal work falls on the devices of a context axis: the (query, key) pairs each
device's queries can see, under the plain and the zigzag layout (ops.context_parallel), for NSA
and for dense causal attention. Counting only, on a CPU in a second (docs/scaling.md).

    python experiments/context_balance.py [--length 131072] [--devices 2 4 8]

A query at position t of a one-document sequence sees (paper hyper-parameters by default)
  compressed tokens  i with i*d + l - 1 <= t:       (t - l + 1) // d + 1 for t >= l - 1, else 0
  selected keys      min(n, t // l' + 1) blocks, all whole but its own: (blocks - 1) * l' + t % l' + 1
  window keys        min(w, t + 1)
  dense causal keys  t + 1
and a device's count is the sum over the positions its chunks hold.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from nsa_jax import NSAConfig  # noqa: E402
from nsa_jax.ops.context_parallel import LAYOUTS, layout_order  # noqa: E402


def visible_per_query(length: int, cfg: NSAConfig) -> dict[str, np.ndarray]:
    """[T] int64 per branch: the keys (compressed tokens for "cmp") query t can see."""
    t = np.arange(length, dtype=np.int64)
    l, d, lp = cfg.compress_block, cfg.compress_stride, cfg.select_block
    blocks = np.minimum(cfg.num_selected, t // lp + 1)
    return {"cmp": np.where(t >= l - 1, (t - l + 1) // d + 1, 0),
            "slc": (blocks - 1) * lp + t % lp + 1,
            "win": np.minimum(cfg.window, t + 1),
            "dense": t + 1}


def pairs_per_device(length: int, cfg: NSAConfig, layout: str, devices: int) -> dict:
    """{"nsa": [N], "dense": [N]}: visible pairs of each device's queries."""
    seen = visible_per_query(length, cfg)
    held = layout_order(length, layout, devices).reshape(devices, -1)
    nsa = seen["cmp"] + seen["slc"] + seen["win"]
    return {"nsa": nsa[held].sum(1), "dense": seen["dense"][held].sum(1)}


def table(length: int, cfg: NSAConfig, device_counts) -> str:
    lines = [f"T = {length:,}; NSA l={cfg.compress_block}, d={cfg.compress_stride}, "
             f"l'={cfg.select_block}, n={cfg.num_selected}, w={cfg.window}; pairs in millions",
             "", "| devices | layout | NSA pairs per device | NSA max/mean | dense causal pairs per "
             "device | dense max/mean |", "|---|---|---|---|---|---|"]
    for devices in device_counts:
        for layout in LAYOUTS:
            counts = pairs_per_device(length, cfg, layout, devices)
            cells = []
            for name in ("nsa", "dense"):
                c = counts[name]
                cells += [" ".join(f"{x / 1e6:,.0f}" for x in c), f"{c.max() / c.mean():.3f}"]
            lines.append(f"| {devices} | {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    print(table(args.length, NSAConfig(), args.devices))


if __name__ == "__main__":
    main()
