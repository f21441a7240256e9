"""The one coupling of decoding to the trainer: a run's workdir -> its model, newest checkpoint."""
from __future__ import annotations

from flax import nnx


def load_trained_model(workdir):
    """-> (DecoderLM of the nsa-train run in `workdir` with its newest good checkpoint's
    parameters, that checkpoint's step)."""
    from nsa_jax.train.checkpoint import Checkpointer
    from nsa_jax.train.model import build_model
    from nsa_jax.train.settings import resolve
    from nsa_jax.train.workdir import load_config

    run = resolve(load_config(workdir))
    graphdef, state = nnx.split(build_model(run.model, run.train.seed))
    checkpointer = Checkpointer(workdir, run.train.max_to_keep)
    try:
        restored = checkpointer.restore_latest(state)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first "
                                f"(nsa-train --config ... --workdir {workdir})")
    return nnx.merge(graphdef, restored[1]), restored[0]
