"""Validation loss and perplexity as a function of the context length the model is given."""
from __future__ import annotations

import dataclasses

from nsa_jax.data import DataConfig, validation_loss


def loss_by_length(eval_step, model_state, data: DataConfig, lengths, batch_size: int,
                   max_batches: int) -> list[dict]:
    """One {"length", "val_loss", "val_perplexity", "val_tokens", "val_loss/<corpus>"} per length:
    the validation split cut into windows of that many tokens (documents packed as they fall)."""
    rows = []
    for length in lengths:
        windows = dataclasses.replace(data, seq_len=length, batch_size=batch_size,
                                      passkey_prob=0.0, mqar_prob=0.0)
        rows.append({"length": length,
                     **validation_loss(eval_step, model_state, windows, max_batches)})
    return rows
