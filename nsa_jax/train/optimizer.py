"""AdamW with linear warmup, cosine decay and global-norm clipping, all from optax."""
from __future__ import annotations

import dataclasses

import jax
import optax

from nsa_jax.train.checks import require_int, require_number


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Peak learning_rate after warmup_steps of linear warmup, then cosine decay to
    learning_rate * final_lr_fraction at the last step; gradients clipped to global norm
    grad_clip before AdamW (b1, b2, eps, weight_decay)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        section = "optimizer."
        require_number(section, "learning_rate", self.learning_rate, 0.0, inclusive=False)
        require_int(section, "warmup_steps", self.warmup_steps, 0)
        require_number(section, "final_lr_fraction", self.final_lr_fraction, 0.0, maximum=1.0)
        require_number(section, "weight_decay", self.weight_decay, 0.0)
        require_number(section, "b1", self.b1, 0.0, maximum=1.0)
        require_number(section, "b2", self.b2, 0.0, maximum=1.0)
        require_number(section, "eps", self.eps, 0.0, inclusive=False)
        require_number(section, "grad_clip", self.grad_clip, 0.0, inclusive=False)


def learning_rate_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Learning rate as a function of the number of updates already applied (warmup_steps <
    steps, checked by settings.resolve)."""
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
