"""Checks shared by the config sections: unknown keys name the valid ones, bad values say what
is expected."""
from __future__ import annotations

import dataclasses
import math


def from_mapping(cls, values, section: str):
    """cls(**values) for a dict / ConfigDict section; a key cls does not have is a ValueError."""
    values = dict(values.items())
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section {section!r}; "
                         f"valid keys: {valid}")
    return cls(**values)


def require_int(section: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config {section}{name} must be an int >= {minimum}, got {value!r}")


def require_number(section: str, name: str, value, minimum: float, *, inclusive=True,
                   maximum: float = math.inf) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= minimum if inclusive else value > minimum) and value <= maximum)
    if not ok:
        low = "[" if inclusive else "("
        raise ValueError(f"config {section}{name} must be a number in {low}{minimum}, {maximum}], "
                         f"got {value!r}")
