"""Runs for tests/test_train_sharding.py in a process of its own, with 8 simulated CPU devices
(the device count must be set before JAX starts, so these cannot share the pytest process).

    python tests/sharded_runs.py WORKDIR     # -> WORKDIR/results.json

One 1-device, one 8-device (data=2 x fsdp=4) and one context-parallel (data=2 x fsdp=2 x
context=2, every sequence split over 2 devices) run of the shrunk tiny config; the 8-device run's
middle checkpoint
resumed on 1 and on 4 devices; the Pallas kernel under a 4-device mesh against the xla
implementation; the trainer's error for a batch the mesh cannot split.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nsa_jax import NSAConfig, ops  # noqa: E402
from nsa_jax.train import resolve, train  # noqa: E402
from nsa_jax.train.loop import Trainer  # noqa: E402
from nsa_jax.train.sharding import MeshSettings, make_mesh  # noqa: E402
from tests.helpers.runs import losses, mesh_config as config, share_compilations  # noqa: E402

def resume_on(source: pathlib.Path, workdir: pathlib.Path, data: int, fsdp: int) -> dict:
    """Resume a copy of `source` without its last checkpoint on a data x fsdp mesh."""
    shutil.copytree(source, workdir)
    shutil.rmtree(max((workdir / "checkpoints").iterdir(), key=lambda step: int(step.name)))
    trainer = Trainer(resolve(config(data, fsdp)), workdir)
    try:
        trainer.resume()
        devices = {len(leaf.sharding.device_set) for leaf in
                   jax.tree.leaves((trainer.model_state, trainer.opt_state))}
        embedding = trainer.model_state["embed"]["embedding"][...]
        resumed_at = trainer.step
        trainer.fit()
    finally:
        trainer.checkpointer.wait()
        trainer.checkpointer.close()
    return {"resumed_at": resumed_at, "devices": sorted(devices),
            "embedding_spec": str(embedding.sharding.spec), "losses": losses(workdir)}


def pallas_under_mesh() -> dict:
    """Selected attention and its gradients, Pallas (per device) vs xla, batch split 4 ways."""
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                    num_init_blocks=1, num_local_blocks=2, window=24)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (4, 64, 2, 16))
    k, v = (jax.random.normal(key, (4, 64, 1, 16)) for key in keys[1:3])
    indices = jnp.sort(jax.random.randint(keys[3], (4, 64, 1, 4), -1, 4), axis=-1)

    def run(implementation):
        loss = lambda q, k, v: jnp.sum(jnp.sin(ops.selected_attention(
            q, k, v, indices, cfg, implementation=implementation)))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return step, jax.device_get(step(q, k, v))

    with jax.set_mesh(make_mesh(MeshSettings(data=1, fsdp=4))):
        step, pallas = run("pallas")
        per_device = "shard_map" in str(jax.make_jaxpr(step)(q, k, v))
    _, xla = run("xla")
    error = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                for a, b in zip(jax.tree.leaves(pallas), jax.tree.leaves(xla)))
    return {"shard_map": per_device, "max_rel_error": error}


def context_split_in_trainer_mesh() -> bool:
    """Whether nsa_attention under the context run's mesh (data=2 x fsdp=2 x context=2, as the
    trainer sets it) traces a shard_map that all-gathers over "context"."""
    x = jnp.zeros((4, 64, 2, 16))
    gates = jnp.zeros((4, 64, 2, 3))
    with jax.set_mesh(make_mesh(MeshSettings(data=2, fsdp=2, context=2))):
        trace = str(jax.make_jaxpr(lambda x, gates: ops.nsa_attention(
            x, x, x, gates, NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                                      num_selected=4, window=16), implementation="xla"))(x, gates))
    return "shard_map" in trace and "all_gather" in trace and "context" in trace


def main(root: pathlib.Path) -> None:
    share_compilations(root / "jax_cache")
    results = {}
    for name, (data, fsdp, context) in {"one": (1, 1, 1), "eight": (2, 4, 1),
                                        "context": (2, 2, 2)}.items():
        train(config(data, fsdp, **{"mesh.context": context}), root / name)
        results[name] = losses(root / name)
    results["eight_on_one"] = resume_on(root / "eight", root / "eight_on_one", 1, 1)
    results["eight_on_four"] = resume_on(root / "eight", root / "eight_on_four", 1, 4)
    results["pallas"] = pallas_under_mesh()
    results["context_split"] = context_split_in_trainer_mesh()
    try:
        train(config(2, 4, **{"data.batch_size": 12}), root / "bad_batch")
    except ValueError as error:
        results["bad_batch_error"] = str(error)
    (root / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
