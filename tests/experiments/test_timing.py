"""experiments/timing.py: per-call time from back-to-back calls, on a host function whose cost is
known (a sleep), so the division by the repetitions and the median are what is checked."""
import time

import jax.numpy as jnp
import pytest

from experiments.timing import device_ms


def test_device_ms_is_the_time_per_call():
    calls = []

    def sleepy():
        calls.append(1)
        time.sleep(0.004)
        return jnp.zeros(())

    ms = device_ms(sleepy, samples=3, min_sample_ms=20.0, warmup=1)
    assert 4.0 <= ms < 8.0
    # warm-up, the calibration call, then 3 samples of ceil(20 / ~4) = 5 or fewer calls each
    assert 2 + 3 * 2 <= len(calls) <= 2 + 3 * 5


def test_device_ms_rejects_bad_counts():
    with pytest.raises(ValueError, match="samples"):
        device_ms(lambda: jnp.zeros(()), samples=0)
