"""The one coupling of decoding to the trainer: a run's workdir -> its model, newest checkpoint."""
from __future__ import annotations

from flax import nnx


def load_trained_model(workdir):
    """-> (DecoderLM of the nsa-train run in `workdir` with its newest good checkpoint's
    parameters, that checkpoint's step)."""
    from nsa_jax.train.checkpoint import restore_trained_model
    from nsa_jax.train.settings import resolve
    from nsa_jax.train.workdir import load_config

    graphdef, state, step = restore_trained_model(resolve(load_config(workdir)), workdir)
    return nnx.merge(graphdef, state), step
