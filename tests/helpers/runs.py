"""The real configs/tiny.py shrunk to seconds, as in-process config and as command-line overrides."""
from __future__ import annotations

import json
import pathlib

from nsa_jax.train import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.py"

SHRINK = {
    "steps": 8, "log_every": 1, "eval_every": 4, "checkpoint_every": 4, "max_to_keep": 3,
    "eval_batches": 1, "data.seq_len": 64, "data.batch_size": 2, "model.d_model": 32,
    "model.num_layers": 1, "model.num_heads": 2, "model.head_dim": 16, "model.mlp_hidden": 64,
    "optimizer.warmup_steps": 2, "eval.lengths": (32, 64), "eval.max_batches": 1,
    "eval.batch_size": 2, "eval.passkey_lengths": (96,), "eval.passkey_depths": (0.0, 1.0),
    "eval.passkey_examples": 2,
}


def tiny_run_config(**changes):
    """configs/tiny.py's get_config() with SHRINK and `changes` (dotted keys) applied."""
    config = load_config_file(TINY)
    for key, value in {**SHRINK, **changes}.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def mesh_config(data: int, fsdp: int, **changes):
    """The shrunk tiny config for the multi-device tests: 8 rows (divisible by 1, 2, 4, 8
    devices), 6 steps with a checkpoint at 3 and 6, the xla implementation, a data x fsdp mesh."""
    return tiny_run_config(**{"data.batch_size": 8, "steps": 6, "checkpoint_every": 3,
                          "eval_every": 6, "model.implementation": "xla", "mesh.data": data,
                          "mesh.fsdp": fsdp, **changes})


def overrides(**changes) -> list[str]:
    """SHRINK and `changes` as --config.key=value arguments."""
    return [f"--config.{k}={v}" for k, v in {**SHRINK, **changes}.items()]


def losses(workdir) -> dict:
    """step -> training loss from workdir/metrics.jsonl."""
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def share_compilations(directory) -> dict:
    """Let every run of a test session reuse compiled steps through JAX's persistent cache
    (runs in one process or in subprocesses given the returned environment)."""
    import jax
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return {"JAX_COMPILATION_CACHE_DIR": str(directory),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
