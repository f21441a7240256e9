"""nsa-train runs of the experiment scripts, advanced in time-limited chunks.

Each run is `python -m nsa_jax.train` in a subprocess; when its chunk of minutes is up it gets
SIGTERM, on which the trainer saves a checkpoint and exits, so re-running the experiment's command
resumes every run where it stopped (chunks keep each command under a machine's time limit).
"""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STOPPED = 128 + signal.SIGTERM  # the trainer's exit code after a SIGTERM-triggered save


def train_chunk(config: pathlib.Path, workdir: pathlib.Path, overrides: list[str],
                minutes: float) -> int:
    """Trains `config` in `workdir` for at most `minutes`; -> the trainer's exit code (0: done)."""
    cmd = [sys.executable, "-m", "nsa_jax.train", "--config", str(config),
           "--workdir", str(workdir), *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        return proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        return proc.wait()


def train_in_chunks(runs: dict[str, tuple[pathlib.Path, pathlib.Path, list[str]]],
                    minutes: float) -> None:
    """runs: label -> (config file, workdir, overrides); one chunk each, in order. Exits with a
    message if a trainer fails; says which runs are finished and which must be resumed."""
    for label, (config, workdir, overrides) in runs.items():
        code = train_chunk(config, workdir, overrides, minutes)
        if code not in (0, STOPPED):
            sys.exit(f"{label} ({config.name}) failed with exit code {code}")
        status = "finished" if code == 0 else "stopped at the chunk limit; run again to resume"
        print(f"{label}: {status}", flush=True)
