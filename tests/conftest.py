"""Fixtures: `key`, fresh random inputs whose seed is printed (replay a failure with
NSA_TEST_SEED=<seed>), and `tiny_run`, the shrunk configs/tiny.py trained once per session.
Helpers live in tests/helpers."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest


@pytest.fixture
def key():
    seed = int(os.environ.get("NSA_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"NSA_TEST_SEED={seed}")
    return jax.random.PRNGKey(seed)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(workdir, summary) of the shrunk configs/tiny.py trained once per session; compiled steps
    are shared with every later run of the session through JAX's persistent cache."""
    from nsa_jax.train import train
    from tests.helpers.runs import share_compilations, tiny_run_config

    share_compilations(tmp_path_factory.getbasetemp() / "jax_cache")
    workdir = tmp_path_factory.mktemp("tiny")
    return workdir, train(tiny_run_config(), workdir)
