"""A trained run, read back: the one way evaluation, generation and experiments reach a run's
model (they use `load_trained_run`, never the trainer's internals)."""
from __future__ import annotations

import pathlib
from typing import NamedTuple

from flax import nnx

from nsa_jax.models import DecoderLM
from nsa_jax.train.checkpoint import Checkpointer
from nsa_jax.train.run_config import RunConfig, resolve
from nsa_jax.train.workdir import load_config


def new_model(run: RunConfig) -> DecoderLM:
    """The run's freshly initialised model (seeded by run.train.seed)."""
    return DecoderLM(run.model, rngs=nnx.Rngs(run.train.seed))


class TrainedRun(NamedTuple):
    run: RunConfig  # the resolved config the run was trained with (plus any overrides)
    graphdef: nnx.GraphDef  # with `state`: nnx.merge(graphdef, state) is the model
    state: nnx.State
    step: int  # the checkpoint's step (optimizer updates applied)

    @property
    def model(self) -> DecoderLM:
        return nnx.merge(self.graphdef, self.state)


def load_trained_run(workdir, config=None) -> TrainedRun:
    """The nsa-train run in `workdir` at its newest good checkpoint, read-only (safe beside a
    running trainer). config: the run's config (a ConfigDict / dict, e.g. from parse_eval_args,
    or a RunConfig); None reads the one nsa-train stored in the workdir. Raises FileNotFoundError
    when the workdir holds no run or no checkpoint yet."""
    if config is None:
        config = load_config(workdir)
    run = config if isinstance(config, RunConfig) else resolve(config)
    graphdef, state = nnx.split(new_model(run))
    checkpointer = Checkpointer(workdir, run.train.max_to_keep, read_only=True)
    try:
        restored = checkpointer.restore_latest(state)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train "
                                f"first (nsa-train --config ... --workdir {workdir})")
    step, state = restored[:2]
    return TrainedRun(run, graphdef, state, step)
