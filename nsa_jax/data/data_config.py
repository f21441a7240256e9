"""DataConfig: everything the data pipeline needs (a run config's `data` section), validated once
on construction with the checks of nsa_jax.config."""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from nsa_jax.config import require_bool, require_int, require_number
from nsa_jax.data.corpora import CORPORA
from nsa_jax.data.tasks import PASSKEY_DIGITS, mqar_min_length, passkey_min_length


def parse_corpora(corpora) -> tuple[tuple[str, float], ...]:
    """"shakespeare:3,python_stdlib:1" (weight defaults to 1), a mapping name -> weight, or
    (name, weight) pairs -> validated (name, weight) pairs in the given order."""
    if isinstance(corpora, str):
        pairs = [(part.partition(":")[0].strip(), part.partition(":")[2].strip() or "1")
                 for part in corpora.split(",") if part.strip()]
    elif hasattr(corpora, "items"):
        pairs = list(corpora.items())
    else:
        pairs = list(corpora)
    allowed = f"allowed names: {sorted(CORPORA)}, weights finite and > 0"
    if not pairs:
        raise ValueError(f"DataConfig.corpora is empty; give at least one corpus ({allowed})")
    parsed = []
    for name, weight in pairs:
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"DataConfig.corpora: weight of {name!r} is {weight!r}; {allowed}") from None
        if name not in CORPORA or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"DataConfig.corpora: got {name!r} with weight {weight}; {allowed}")
        parsed.append((name, weight))
    if len({n for n, _ in parsed}) != len(parsed):
        raise ValueError(f"DataConfig.corpora names a corpus twice: {[n for n, _ in parsed]}")
    return tuple(parsed)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """corpora: name -> sampling weight (see parse_corpora for the accepted forms); seq_len and
    batch_size: the [B, T] of every batch; validation_fraction: share of each corpus's documents
    held out; passkey_prob / mqar_prob: chance that a training row is a passkey / MQAR example
    instead of corpus text; mqar_num_pairs: key-value pairs per MQAR example; packed: False leaves
    segment_ids out of every batch, so the model attends over each row as one sequence (plain
    causal attention, the layout of one document per row) while the loss mask still skips targets
    across a document boundary: the unpacked baseline of experiments/bench_model.py."""

    # Field declarations: alike in form to ModelConfig's (a `duplicates` pair), not shared logic.
    corpora: tuple[tuple[str, float], ...] | Mapping[str, float] | str = (("shakespeare", 1.0),)
    seq_len: int = 256
    batch_size: int = 8
    validation_fraction: float = 0.1
    passkey_prob: float = 0.0
    mqar_prob: float = 0.0
    mqar_num_pairs: int = 8
    packed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "corpora", parse_corpora(self.corpora))
        for key in ("seq_len", "batch_size", "mqar_num_pairs"):
            require_int(f"DataConfig.{key}", getattr(self, key), 1)
        require_number("DataConfig.validation_fraction", self.validation_fraction, 0.0,
                       inclusive=False, maximum=1.0, maximum_inclusive=False)
        require_bool("DataConfig.packed", self.packed)
        for key in ("passkey_prob", "mqar_prob"):
            require_number(f"DataConfig.{key}", getattr(self, key), 0.0, maximum=1.0)
        if self.passkey_prob + self.mqar_prob > 1:
            raise ValueError(f"DataConfig.passkey_prob + mqar_prob must be <= 1, got "
                             f"{self.passkey_prob} + {self.mqar_prob}")
        needs = {"passkey_prob": (self.passkey_prob, passkey_min_length(PASSKEY_DIGITS)),
                 "mqar_prob": (self.mqar_prob, mqar_min_length(self.mqar_num_pairs))}
        for key, (prob, min_len) in needs.items():
            if prob > 0 and self.seq_len < min_len:
                raise ValueError(f"DataConfig.{key} > 0 needs seq_len >= {min_len} (got "
                                 f"{self.seq_len}); raise seq_len, lower mqar_num_pairs or set "
                                 f"{key}=0")
