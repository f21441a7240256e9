"""A run's ConfigDict -> validated frozen dataclasses, one per section.

Top level: name, seed, steps, log_every, eval_every, eval_batches, checkpoint_every, max_to_keep,
and the sections data (nsa_jax.data.DataConfig), model (ModelConfig, with model.nsa: NSAConfig),
optimizer (OptimizerConfig), mesh (MeshSettings: devices and hosts) and eval (EvalSettings, read by
nsa-eval).
"""
from __future__ import annotations

import dataclasses

from nsa_jax.config import ModelConfig
from nsa_jax.data import VOCAB_SIZE, DataConfig, passkey_min_length
from nsa_jax.train.checks import from_mapping, require_int, require_number
from nsa_jax.train.model import model_config
from nsa_jax.train.optimizer import OptimizerConfig
from nsa_jax.train.sharding import MeshSettings

PASSKEY_DIGITS = 5
SECTIONS = ("data", "model", "optimizer", "mesh", "eval")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Steps count optimizer updates: "step k" is the state after k updates, whose last batch was
    make_train_batch(data, seed, k - 1). Evaluation and checkpoints happen every *_every steps and
    at the last step."""

    name: str = "run"
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8  # validation batches per corpus at each periodic evaluation
    checkpoint_every: int = 500
    max_to_keep: int = 2

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"config name must be a non-empty string, got {self.name!r}")
        require_int("", "seed", self.seed, 0)
        for key in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                    "max_to_keep"):
            require_int("", key, getattr(self, key), 1)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """nsa-eval: validation loss at each of `lengths` tokens of context (up to max_batches batches
    of batch_size rows per corpus), and passkey accuracy over passkey_examples examples in each
    (passkey_lengths x passkey_depths) cell; depth 0 puts the key at the start, 1 at the end."""

    lengths: tuple = (256,)
    batch_size: int = 8
    max_batches: int = 4
    passkey_lengths: tuple = (256,)
    passkey_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_examples: int = 8

    def __post_init__(self):
        for key in ("batch_size", "max_batches", "passkey_examples"):
            require_int("eval.", key, getattr(self, key), 1)
        minimum = passkey_min_length(PASSKEY_DIGITS)
        for key, low in (("lengths", 2), ("passkey_lengths", minimum)):
            values = getattr(self, key)
            if not isinstance(values, (tuple, list)) or not values:
                raise ValueError(f"config eval.{key} must be a non-empty tuple of ints, got "
                                 f"{values!r}")
            for value in values:
                require_int("eval.", key, value, low)
            object.__setattr__(self, key, tuple(values))
        if not isinstance(self.passkey_depths, (tuple, list)) or not self.passkey_depths:
            raise ValueError(f"config eval.passkey_depths must be a non-empty tuple of numbers in "
                             f"[0, 1], got {self.passkey_depths!r}")
        for value in self.passkey_depths:
            require_number("eval.", "passkey_depths", value, 0.0, maximum=1.0)
        object.__setattr__(self, "passkey_depths", tuple(float(d) for d in self.passkey_depths))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    train: TrainSettings
    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    mesh: MeshSettings
    eval: EvalSettings


def resolve(config) -> RunConfig:
    """A ConfigDict (or dict) -> RunConfig; any bad key or value is a ValueError saying which."""
    values = dict(config.items())
    sections = {name: values.pop(name, {}) for name in SECTIONS}
    valid = [f.name for f in dataclasses.fields(TrainSettings)] + list(SECTIONS)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; valid keys: {valid}")
    try:
        data = DataConfig.from_mapping(sections["data"])
    except TypeError as error:
        raise ValueError(f"config data: {error}") from None
    run = RunConfig(train=TrainSettings(**values), data=data,
                    model=model_config(sections["model"]),
                    optimizer=from_mapping(OptimizerConfig, sections["optimizer"], "optimizer"),
                    mesh=from_mapping(MeshSettings, sections["mesh"], "mesh"),
                    eval=from_mapping(EvalSettings, sections["eval"], "eval"))
    if run.optimizer.warmup_steps >= run.train.steps:
        raise ValueError(f"config optimizer.warmup_steps ({run.optimizer.warmup_steps}) must be "
                         f"smaller than steps ({run.train.steps})")
    if run.model.vocab_size < VOCAB_SIZE:
        raise ValueError(f"config model.vocab_size must be >= {VOCAB_SIZE} (the byte tokenizer's "
                         f"vocabulary), got {run.model.vocab_size}")
    return run
