"""A run's config file: every key of it and its check. `resolve` turns the ConfigDict that a
config file's get_config() returns (configs/*.py, with command-line overrides) into validated
frozen dataclasses, one per section.

Top level: name, seed, steps, log_every, eval_every, eval_batches, checkpoint_every, max_to_keep,
loss_normalization (TrainSettings), and the sections data (nsa_jax.data.DataConfig), model
(nsa_jax.config.ModelConfig, with model.nsa: NSAConfig), optimizer (OptimizerConfig), mesh
(MeshSettings: devices and hosts) and eval (EvalSettings, read by nsa-eval). Every value check
comes from nsa_jax.config. `full_attention_twin` builds a config's matched full-attention baseline.
"""
from __future__ import annotations

import dataclasses
import math

from nsa_jax.config import (ModelConfig, NSAConfig, check_keys, from_mapping, require_bool,
                            require_choice, require_int, require_number)
from nsa_jax.data import PASSKEY_DIGITS, VOCAB_SIZE, DataConfig, passkey_min_length
from nsa_jax.models import LOSS_NORMALIZATIONS, matching_mlp_hidden, num_params
from nsa_jax.ops.context_parallel import CONTEXT_AXIS

SECTIONS = ("data", "model", "optimizer", "mesh", "eval")
AXES = ("data", "fsdp", CONTEXT_AXIS)  # the device mesh's axes (sharding.py)
ROW_AXES = AXES[:2]  # the axes that split the batch's rows; CONTEXT_AXIS splits its sequences


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Steps count optimizer updates: "step k" is the state after k updates, whose last batch was
    make_train_batch(data, seed, k - 1). Evaluation and checkpoints happen every *_every steps and
    at the last step. loss_normalization: how the training loss averages over target tokens
    ("token": over the batch's, "row": over each row's first, then over rows; see
    nsa_jax.models.mean_loss); validation loss is always per token."""

    name: str = "run"
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8  # validation batches per corpus at each periodic evaluation
    checkpoint_every: int = 500
    max_to_keep: int = 2
    loss_normalization: str = "token"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"config name must be a non-empty string, got {self.name!r}")
        require_int("config seed", self.seed, 0)
        for key in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                    "max_to_keep"):
            require_int(f"config {key}", getattr(self, key), 1)
        require_choice("config loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)


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
            require_int(f"config eval.{key}", getattr(self, key), 1)
        minimum = passkey_min_length(PASSKEY_DIGITS)
        for key, low in (("lengths", 2), ("passkey_lengths", minimum)):
            values = getattr(self, key)
            if not isinstance(values, (tuple, list)) or not values:
                raise ValueError(f"config eval.{key} must be a non-empty tuple of ints, got "
                                 f"{values!r}")
            for value in values:
                require_int(f"config eval.{key}", value, low)
            object.__setattr__(self, key, tuple(values))
        if not isinstance(self.passkey_depths, (tuple, list)) or not self.passkey_depths:
            raise ValueError(f"config eval.passkey_depths must be a non-empty tuple of numbers in "
                             f"[0, 1], got {self.passkey_depths!r}")
        for value in self.passkey_depths:
            require_number("config eval.passkey_depths", value, 0.0, maximum=1.0)
        object.__setattr__(self, "passkey_depths", tuple(float(d) for d in self.passkey_depths))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Peak learning_rate after warmup_steps of linear warmup (at most half the run's steps:
    a shorter run caps it there), then cosine decay to learning_rate * final_lr_fraction at the
    last step; gradients clipped to global norm grad_clip before AdamW (b1, b2, eps,
    weight_decay)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        where = "config optimizer."
        require_int(where + "warmup_steps", self.warmup_steps, 0)
        for name, minimum, inclusive, maximum in (
                ("learning_rate", 0.0, False, math.inf), ("final_lr_fraction", 0.0, True, 1.0),
                ("weight_decay", 0.0, True, math.inf), ("b1", 0.0, True, 1.0),
                ("b2", 0.0, True, 1.0), ("eps", 0.0, False, math.inf),
                ("grad_clip", 0.0, False, math.inf)):
            require_number(where + name, getattr(self, name), minimum, inclusive=inclusive,
                           maximum=maximum)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """data x fsdp x context devices (data or fsdp may be -1: all devices the others leave). A
    mesh smaller than the machine uses its first data * fsdp * context devices (single process
    only). context > 1 splits every sequence over that many devices (context parallelism,
    nsa_jax.ops.context_parallel). distributed=True calls jax.distributed.initialize() before
    anything touches a device (also done whenever JAX_COORDINATOR_ADDRESS is set)."""

    data: int = 1
    fsdp: int = -1
    context: int = 1
    distributed: bool = False

    def __post_init__(self):
        for key in ROW_AXES:
            value = getattr(self, key)
            if value != -1:
                require_int(f"config mesh.{key}", value, 1)
        require_int("config mesh.context", self.context, 1)
        if self.data == self.fsdp == -1:
            raise ValueError("config mesh.data and mesh.fsdp cannot both be -1 (fill); set one "
                             "of them to a device count")
        require_bool("config mesh.distributed", self.distributed)

    def sizes(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, context) with -1 filled in for `num_devices` devices."""
        given = (self.data, self.fsdp, self.context)
        fixed = math.prod(s for s in given if s != -1)
        if fixed > num_devices or (-1 in given and num_devices % fixed):
            fill = " (-1 fills the rest, so the other sizes must divide it)" if -1 in given else ""
            raise ValueError(f"config mesh data={self.data} x fsdp={self.fsdp} x context="
                             f"{self.context} does not fit the {num_devices} device(s) here{fill}")
        return tuple(num_devices // fixed if s == -1 else s for s in given)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    train: TrainSettings
    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    mesh: MeshSettings
    eval: EvalSettings


def model_config(section) -> ModelConfig:
    """The config's `model` section (with its `nsa` sub-section) -> a validated ModelConfig."""
    values = dict(section.items())
    values["nsa"] = from_mapping(NSAConfig, values.get("nsa", {}), "model.nsa")
    return from_mapping(ModelConfig, values, "model")


def full_attention_twin(config):
    """A config file's ConfigDict of an NSA model -> the same with model.attention="full" and
    model.mlp_hidden widened so that the parameter count is the nearest to the NSA model's (the
    matched baseline of issue 21). Changes `config` in place and returns it."""
    nsa = model_config(config.model)
    if nsa.attention != "nsa":
        raise ValueError(f"full_attention_twin needs a config with model.attention='nsa', got "
                         f"{nsa.attention!r}")
    config.model.attention = "full"
    config.model.mlp_hidden = matching_mlp_hidden(dataclasses.replace(nsa, attention="full"),
                                                  num_params(nsa))
    return config


def resolve(config) -> RunConfig:
    """A ConfigDict (or dict) -> RunConfig; any bad key or value is a ValueError saying which."""
    values = dict(config.items())
    sections = {name: values.pop(name, {}) for name in SECTIONS}
    check_keys(values, [f.name for f in dataclasses.fields(TrainSettings)] + list(SECTIONS),
               "top level")
    run = RunConfig(train=TrainSettings(**values),
                    data=from_mapping(DataConfig, sections["data"], "data"),
                    model=model_config(sections["model"]),
                    optimizer=from_mapping(OptimizerConfig, sections["optimizer"], "optimizer"),
                    mesh=from_mapping(MeshSettings, sections["mesh"], "mesh"),
                    eval=from_mapping(EvalSettings, sections["eval"], "eval"))
    if run.model.vocab_size < VOCAB_SIZE:
        raise ValueError(f"config model.vocab_size must be >= {VOCAB_SIZE} (the byte tokenizer's "
                         f"vocabulary), got {run.model.vocab_size}")
    return run
