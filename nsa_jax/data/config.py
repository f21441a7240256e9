"""DataConfig: everything the data pipeline needs, validated once on construction."""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from nsa_jax.data.corpora import CORPORA
from nsa_jax.data.tasks import mqar_min_length, passkey_min_length

PASSKEY_DIGITS = 5


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


def _require_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DataConfig.{key} must be an int >= {minimum}, got {value!r}")


def _require_fraction(key: str, value, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"DataConfig.{key} must be a number in {interval}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """corpora: name -> sampling weight (see parse_corpora for the accepted forms); seq_len and
    batch_size: the [B, T] of every batch; validation_fraction: share of each corpus's documents
    held out; passkey_prob / mqar_prob: chance that a training row is a passkey / MQAR example
    instead of corpus text; mqar_num_pairs: key-value pairs per MQAR example."""

    corpora: tuple[tuple[str, float], ...] | Mapping[str, float] | str = (("shakespeare", 1.0),)
    seq_len: int = 256
    batch_size: int = 8
    validation_fraction: float = 0.1
    passkey_prob: float = 0.0
    mqar_prob: float = 0.0
    mqar_num_pairs: int = 8

    @classmethod
    def from_mapping(cls, values) -> "DataConfig":
        """From a dict or ml_collections ConfigDict; a misspelt key names the valid ones."""
        values = dict(values.items())
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown DataConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**values)

    def __post_init__(self):
        object.__setattr__(self, "corpora", parse_corpora(self.corpora))
        _require_int("seq_len", self.seq_len, 1)
        _require_int("batch_size", self.batch_size, 1)
        _require_int("mqar_num_pairs", self.mqar_num_pairs, 1)
        _require_fraction("validation_fraction", self.validation_fraction, True, True)
        _require_fraction("passkey_prob", self.passkey_prob, False, False)
        _require_fraction("mqar_prob", self.mqar_prob, False, False)
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
