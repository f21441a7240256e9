"""What ran where, for docs/results.md: each experiment command is appended to OUT/commands.jsonl
(`record_command`), and `provenance_lines` turns that and the runs' run_info.json files into the
lines every result there carries: configs, commands, device, dates and commit."""
from __future__ import annotations

import datetime
import json
import pathlib
import shlex
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsa_jax.train.workdir import source_commit  # noqa: E402

NOT_RECORDED = "not recorded (run outside a git checkout)"


def record_command(out: pathlib.Path, script: str, argv: list[str]) -> None:
    """Appends `python experiments/<script> <argv>` with the time and commit to
    OUT/commands.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
             "commit": source_commit(),
             "command": shlex.join(["python", f"experiments/{script}", *argv])}
    with (out / "commands.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _commands(out: pathlib.Path) -> list[tuple[str, int]]:
    """(command, times run) in the order each was first run."""
    path = out / "commands.jsonl"
    counts = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        command = json.loads(line)["command"]
        counts[command] = counts.get(command, 0) + 1
    return list(counts.items())


def _config_and_overrides(command: list[str]) -> tuple[str, list[str]]:
    """The trainer's argv (run_info.json) -> (config file relative to the repository if inside
    it, the --config.key=value overrides other than the seed)."""
    config = pathlib.Path(command[command.index("--config") + 1])
    if config.is_absolute() and config.is_relative_to(ROOT):
        config = config.relative_to(ROOT)
    overrides = [a for a in command if a.startswith("--config.") and
                 not a.startswith("--config.seed=")]
    return str(config), overrides


def _joined(values) -> str:
    return ", ".join(str(v) for v in values)


def provenance_lines(out: pathlib.Path, workdirs: dict[str, dict[int, pathlib.Path]]
                     ) -> list[str]:
    """Markdown bullets for the runs `workdirs` ({arm: {seed: workdir}}) of the study in OUT."""
    infos = {(arm, seed): json.loads((workdir / "run_info.json").read_text())
             for arm, seeds in workdirs.items() for seed, workdir in seeds.items()}
    configs, overrides = [], set()
    for arm, seeds in workdirs.items():
        config, extra = _config_and_overrides(infos[arm, next(iter(seeds))]["command"])
        configs.append(f"`{config}` (seeds {_joined(seeds)})")
        overrides.update(extra)
    devices = sorted({f"{len(i['devices'])} x {_joined(sorted(set(i['devices'])))} "
                      f"({i['backend']})" for i in infos.values()})
    versions = sorted({i["packages"]["jax"] for i in infos.values()})
    started = sorted(i["started"] for i in infos.values())
    commits = sorted({i.get("commit") or NOT_RECORDED for i in infos.values()})
    commands = [f"`{command}`" + (f" ({times}x)" if times > 1 else "")
                for command, times in _commands(out)]
    lines = [f"* Configs: {_joined(configs)}" +
             (f"; overrides {_joined(f'`{o}`' for o in sorted(overrides))}" if overrides else ""),
             f"* Device: {'; '.join(devices)}; jax {_joined(versions)}.",
             f"* Date: last training chunks started {started[0]} to {started[-1]}; "
             f"commit {_joined(commits)}.",
             "* Commands (repository root, in the order first run; a repeated command resumes "
             f"where the last one stopped): {_joined(commands) or 'not recorded'}."]
    return lines
