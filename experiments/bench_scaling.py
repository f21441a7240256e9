"""Tokens/s of one config trained on 1 device and on N devices (same global batch), and the final
loss of each: the scaling efficiency of the trainer's sharding (docs/scaling.md).

    python experiments/bench_scaling.py --devices 2 --steps 30 [--config.key=value ...]

Runs `python -m nsa_jax.train --config configs/small_nsa.py` (shrunk to --steps steps with
evaluation and checkpointing only at the ends) once per mesh, one after another, each in its own
process: 1 device, then N devices FSDP (data=1, fsdp=N), then N devices data-parallel (data=N,
fsdp=1).
Throughput is the mean of the logged tokens/s after the first log window (compilation excluded);
efficiency = tokens/s on N devices / (N x tokens/s on 1). Prints a markdown table; with --out,
also writes it there after every run. Extra arguments override the config of every run.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments.trainer_throughput import trainer_throughput  # noqa: E402


def run(mesh: tuple[int, int], args, extra: list[str], root: pathlib.Path) -> dict:
    result = trainer_throughput(args.config, root / f"data{mesh[0]}_fsdp{mesh[1]}", args.steps,
                                [f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
                                 *extra])
    del result["header"]  # printed already, with the trainer's other lines
    return {"devices": mesh[0] * mesh[1], "mesh": f"data={mesh[0]} x fsdp={mesh[1]}", **result}


def table(results: list[dict]) -> str:
    base = results[0]["tokens_per_s"]
    lines = ["| mesh | GPUs | tokens/s | scaling efficiency | final train loss | final val_loss "
             "| wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mesh']} | {r['devices']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / (r['devices'] * base):.2f} | {r['loss']:.4f} | "
                     f"{r['val_loss']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--config", default="configs/small_nsa.py")
    parser.add_argument("--out", type=pathlib.Path)
    args, extra = parser.parse_known_args()
    results = []
    with tempfile.TemporaryDirectory() as root:
        for mesh in ((1, 1), (1, args.devices), (args.devices, 1)):
            results.append(run(mesh, args, extra, pathlib.Path(root)))
            print(table(results), flush=True)
            if args.out:
                args.out.write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
