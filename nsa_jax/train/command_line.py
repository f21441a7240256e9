"""Command-line parsing shared by nsa-train and nsa-eval: ml_collections config flags, with
errors that say which key or value was wrong and what the valid keys are."""
from __future__ import annotations

import argparse
import importlib.util
import pathlib

import ml_collections
from absl import flags
from ml_collections import config_flags

from nsa_jax.train.workdir import load_config

OVERRIDE = "--config."


def parse_train_args(argv: list[str], prog: str = "nsa-train"):
    """[--config FILE, --workdir DIR, --config.key=value ...] -> (ConfigDict, workdir).
    The workdir defaults to runs/<config file name without .py>."""
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--config")
    known, rest = parser.parse_known_args(argv)
    if known.config is None:
        raise ValueError(f"{prog} needs --config FILE (e.g. --config configs/tiny.py)")
    loaded = load_config_file(known.config)
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "run directory (default runs/NAME)", flag_values=values)
    define = lambda: config_flags.DEFINE_config_dict(
        "config", loaded, flag_values=values, lock_config=True, sys_argv=[prog, *rest])
    config = _parse(values, define, rest, prog, lambda: loaded)
    workdir = values.workdir or str(pathlib.Path("runs") / pathlib.Path(known.config).stem)
    return config, workdir


def parse_eval_args(argv: list[str], prog: str = "nsa-eval"):
    """[--workdir DIR, --config.key=value ...] -> (ConfigDict, workdir); the config is the one
    nsa-train stored in the workdir, overrides applied."""
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--workdir", required=True)
    known, rest = parser.parse_known_args(argv)
    values = flags.FlagValues()
    stored = _frozen_tuples(load_config(known.workdir))
    define = lambda: config_flags.DEFINE_config_dict(
        "config", stored, flag_values=values, lock_config=True, sys_argv=[prog, *rest])
    return _parse(values, define, rest, prog, lambda: stored), known.workdir


def _parse(values: flags.FlagValues, define, argv: list[str], prog: str, original):
    """define() the config flag in `values` and parse argv; original() -> the config before
    overrides, to explain errors (overrides may fail in either call)."""
    try:
        define()
        rest = values([prog, *argv])
        config = values.config
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(_unknown_key(original(), argv) or str(error)) from None
    if len(rest) > 1:
        raise ValueError(f"unexpected arguments {rest[1:]}; expected --config FILE, "
                         "--workdir DIR and --config.key=value overrides")
    return config


def _unknown_key(config, argv: list[str]) -> str | None:
    """A message naming the first override whose key path the config lacks, if any."""
    if not isinstance(config, ml_collections.ConfigDict):
        return None
    for arg in argv:
        if not arg.startswith(OVERRIDE):
            continue
        node, path = config, arg[len(OVERRIDE):].split("=", 1)[0].split(".")
        for depth, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(["config", *path[:depth]])
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return (f"unknown config key {'.'.join(path[:depth + 1])!r} in {arg!r}; valid "
                        f"keys of {where}: {valid}")
            node = node[key]
    return None


def load_config_file(path) -> ml_collections.ConfigDict:
    """get_config() of a config file (configs build on each other with it). A missing file is a
    FileNotFoundError naming it; a file that fails to load, a ValueError naming it and the
    error."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found (a relative path starts at "
                                f"{pathlib.Path.cwd()})")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as error:  # the user's file: say which one failed, and how
        raise ValueError(f"config file {path} failed to load: {type(error).__name__}: "
                         f"{error}") from error


def _frozen_tuples(value):
    """JSON lists back to the tuples the config files use, so overrides type-check alike."""
    if isinstance(value, dict):
        return ml_collections.ConfigDict({k: _frozen_tuples(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen_tuples(v) for v in value)
    return value
