"""One of the two processes of a multi-process run for tests/test_train_sharding.py: 2 simulated
CPU devices per process, started by jax.distributed.initialize() from the environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID), each process building only its
rows of every batch.

    python tests/two_process_run.py WORKDIR
"""
from __future__ import annotations

import pathlib
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

from nsa_jax.train import train  # noqa: E402
from tests.helpers.runs import mesh_config  # noqa: E402

if __name__ == "__main__":
    train(mesh_config(2, -1), pathlib.Path(sys.argv[1]))
    print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices")
