"""Validation loss of a model state over each configured corpus's held-out documents."""
from __future__ import annotations

import math

from nsa_jax.data import DataConfig, validation_batches


def validation_loss(eval_step, model_state, data: DataConfig, max_batches: int | None) -> dict:
    """{"val_loss", "val_perplexity", "val_loss/<corpus>", "val_tokens"}: mean loss per target
    token over up to max_batches batches of each corpus (all corpora pooled for val_loss)."""
    per_corpus = {}
    for corpus, _ in data.corpora:
        sums = [eval_step(model_state, batch) for batch in
                validation_batches(data, corpus, max_batches)]
        per_corpus[corpus] = (sum(float(t) for t, _ in sums), sum(float(c) for _, c in sums))
    total = sum(t for t, _ in per_corpus.values())
    count = sum(c for _, c in per_corpus.values())
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
            "val_tokens": int(count), **{f"val_loss/{k}": t / c for k, (t, c) in per_corpus.items()}}
