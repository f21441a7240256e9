"""The trainer's only coupling to nsa_jax.models: config -> model, model -> logits and gates."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import ModelConfig, NSAConfig
from nsa_jax.models import DecoderLM
from nsa_jax.train.checks import from_mapping

BRANCHES = ("cmp", "slc", "win")


def model_config(section) -> ModelConfig:
    """The config's `model` section (with its `nsa` sub-section) -> a validated ModelConfig."""
    values = dict(section.items())
    values["nsa"] = from_mapping(NSAConfig, values.get("nsa", {}), "model.nsa")
    return from_mapping(ModelConfig, values, "model")


def build_model(cfg: ModelConfig, seed: int) -> nnx.Module:
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


def forward(model: nnx.Module, batch: dict):
    """-> (logits [B, T, V] float32, {"gate_<branch>": mean gate over layers} or {})."""
    logits, aux = model(batch["tokens"], segment_ids=batch["segment_ids"], return_aux=True)
    if "gate_mean" not in aux:
        return logits, {}
    per_branch = jnp.mean(aux["gate_mean"], axis=0)
    return logits, {f"gate_{name}": per_branch[i] for i, name in enumerate(BRANCHES)}
