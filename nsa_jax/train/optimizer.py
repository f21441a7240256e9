"""AdamW with linear warmup, cosine decay and global-norm clipping, all from optax."""
from __future__ import annotations

import jax
import optax

from nsa_jax.train.run_config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Learning rate as a function of the number of updates already applied (warmup_steps <
    steps, checked by run_config.resolve)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=steps, end_value=cfg.learning_rate * cfg.final_lr_fraction)


def make_optimizer(cfg: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_matrices))


def _matrices(params):
    # decaying norm scales and biases only pulls them toward zero, away from their useful init
    return jax.tree.map(lambda p: p.ndim >= 2, params)
