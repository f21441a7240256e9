"""AdamW with linear warmup, cosine decay and global-norm clipping, all from optax."""
from __future__ import annotations

import jax
import optax

from nsa_jax.train.run_config import OptimizerConfig


def warmup_steps(cfg: OptimizerConfig, steps: int) -> int:
    """The warm-up a run of `steps` uses: cfg.warmup_steps, capped at half the run, so a short
    run of any config (e.g. --config.steps=10) still warms up and then decays."""
    return min(cfg.warmup_steps, steps // 2)


def learning_rate_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Learning rate as a function of the number of updates already applied."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup_steps(cfg, steps),
        decay_steps=steps, end_value=cfg.learning_rate * cfg.final_lr_fraction)


def make_optimizer(cfg: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_matrices))


def _matrices(params):
    # decaying norm scales and biases only pulls them toward zero, away from their useful init
    return jax.tree.map(lambda p: p.ndim >= 2, params)
