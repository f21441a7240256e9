"""nsa-train runs of the experiment scripts: a study's runs (config files x seeds) advanced in
time-limited chunks, one at a time or side by side, one per GPU.

Each run is `python -m nsa_jax.train` in a subprocess; when the command's minutes are up it gets
SIGTERM, on which the trainer saves a checkpoint and exits, so re-running the experiment's command
resumes every run where it stopped (chunks keep each command under a machine's time limit). A run
whose final evaluation is in its metrics.jsonl is finished and is not started again.

A study lives in OUT/<config file stem>/seed<k>, one workdir per config and seed.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsa_jax.train import RunConfig, parse_train_args, resolve  # noqa: E402
from nsa_jax.train.metrics import MetricsLog  # noqa: E402

# the trainer's exit code after a SIGTERM-triggered save, and the one of a trainer that got the
# SIGTERM while still starting up (nothing trained yet, so nothing lost)
STOPPED = (128 + signal.SIGTERM, -signal.SIGTERM)
MIN_CHUNK_MINUTES = 2.0  # a shorter chunk would be mostly start-up and compilation
SEED_DIR = re.compile(r"seed(\d+)")


@dataclasses.dataclass(frozen=True)
class Run:
    config: pathlib.Path
    workdir: pathlib.Path
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.workdir.parent.name}/{self.workdir.name}"

    def settings(self) -> RunConfig:
        """The resolved config this run trains with (a bad config or override raises here)."""
        return resolve(parse_train_args(["--config", str(self.config), *self.overrides])[0])

    def finished(self) -> bool:
        return is_finished(self.workdir, self.settings().train.steps)


def is_finished(workdir: pathlib.Path, steps: int) -> bool:
    """The trainer logged its final evaluation (it runs after the last checkpoint is written)."""
    return any(r["step"] == steps and "val_loss" in r for r in MetricsLog(workdir).read())


def study_runs(configs, seeds, out: pathlib.Path, overrides=()) -> list[Run]:
    """Every config with every seed in OUT/<config stem>/seed<k> (--config.seed=k), seed by seed,
    so that a study cut short holds whole seeds. Raises ValueError for a bad config or override,
    or configs that are not comparable (check_comparable)."""
    if not configs or not seeds:
        raise ValueError(f"a study needs at least one config and one seed, got {list(configs)} "
                         f"and {list(seeds)}")
    stems = [pathlib.Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"config file names must differ (each names its runs' folder): {stems}")
    for config in configs:
        if not pathlib.Path(config).is_file():
            raise FileNotFoundError(f"config file {config} not found")
    runs = [Run(pathlib.Path(config).resolve(), out / pathlib.Path(config).stem / f"seed{seed}",
                (*overrides, f"--config.seed={seed}")) for seed in seeds for config in configs]
    settings = {run: run.settings() for run in runs}
    check_comparable({(run.workdir.parent.name, s.train.seed): s for run, s in settings.items()})
    return runs


def check_comparable(runs: dict) -> None:
    """runs: {(arm, seed): RunConfig}. The comparison is fair only if every run trains on the same
    data with the same optimizer, steps and schedule (train settings but name and seed), and the
    runs of one arm differ in their seed alone."""
    (first_arm, first_seed), first = next(iter(runs.items()))
    plain = lambda train: dataclasses.replace(train, name="-", seed=0)
    for (arm, seed), run in runs.items():
        for section, a, b in (("data", run.data, first.data),
                              ("optimizer", run.optimizer, first.optimizer),
                              ("train", plain(run.train), plain(first.train))):
            if a != b:
                raise ValueError(f"{arm}/seed{seed} and {first_arm}/seed{first_seed} differ in "
                                 f"their {section} settings: {a} vs {b}")
        arm_first = next(r for (a, _), r in runs.items() if a == arm)
        if run.model != arm_first.model:
            raise ValueError(f"the runs of {arm} differ in their model: {run.model} vs "
                             f"{arm_first.model}")


def study_workdirs(out: pathlib.Path) -> dict[str, dict[int, pathlib.Path]]:
    """{config stem: {seed: workdir}} of the trained (config.json holding) runs under OUT."""
    found = {}
    for config_json in sorted(out.glob("*/seed*/config.json")):
        match = SEED_DIR.fullmatch(config_json.parent.name)
        if match:
            found.setdefault(config_json.parent.parent.name, {})[int(match[1])] = config_json.parent
    return {arm: dict(sorted(seeds.items())) for arm, seeds in found.items()}


def train_chunk(config: pathlib.Path, workdir: pathlib.Path, overrides, minutes: float, *,
                device: int | None = None) -> int:
    """Trains `config` in `workdir` for at most `minutes`; -> the trainer's exit code (0: done).
    With `device`, only that GPU is visible to it (and JAX_PLATFORMS defaults to cuda, so a GPU
    that is not there is an error, not a silent run on the CPU), and its output lines are
    prefixed with it."""
    cmd = [sys.executable, "-m", "nsa_jax.train", "--config", str(config),
           "--workdir", str(workdir), *overrides]
    prefix = "" if device is None else f"[gpu {device}] "
    env = None if device is None else {"JAX_PLATFORMS": "cuda", **os.environ,
                                       "CUDA_VISIBLE_DEVICES": str(device)}
    print(prefix + "$ " + " ".join(cmd), flush=True)
    piped = subprocess.PIPE if device is not None else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=piped,
                            stderr=subprocess.STDOUT if piped else None, text=True)

    def stop():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    timer = threading.Timer(minutes * 60, stop)
    timer.start()
    try:
        for line in proc.stdout or ():
            print(prefix + line, end="", flush=True)
        return proc.wait()
    finally:
        timer.cancel()


def train_within(runs: list[Run], minutes: float, gpus: int = 1) -> list[Run]:
    """Advances the unfinished `runs` in order until `minutes` have passed (no chunk starts with
    less than MIN_CHUNK_MINUTES left): one at a time on all devices, or with gpus > 1 side by side,
    each GPU taking the next unfinished run. -> the runs still unfinished. Exits with a message if
    a trainer fails."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    todo = queue.SimpleQueue()
    for run in runs:
        if not run.finished():
            todo.put(run)
    deadline, failures = time.monotonic() + minutes * 60, []

    def work(device):
        while (left := deadline - time.monotonic()) >= MIN_CHUNK_MINUTES * 60:
            try:
                run = todo.get_nowait()
            except queue.Empty:
                return
            start = time.monotonic()
            code = train_chunk(run.config, run.workdir, run.overrides, left / 60, device=device)
            took = f"{(time.monotonic() - start) / 60:.1f} min this chunk"
            if code not in (0, *STOPPED):
                failures.append(f"{run.label} failed with exit code {code}")
                return
            print(f"{run.label}: {'finished' if code == 0 else 'stopped'} ({took})", flush=True)

    workers = [threading.Thread(target=work, args=(d if gpus > 1 else None,)) for d in range(gpus)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        sys.exit("; ".join(failures))
    unfinished = [run for run in runs if not run.finished()]
    print(f"{len(runs) - len(unfinished)} of {len(runs)} runs finished" +
          (f"; run the same command again to continue {', '.join(r.label for r in unfinished)}"
           if unfinished else ""), flush=True)
    return unfinished
