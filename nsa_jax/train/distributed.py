"""Several processes (hosts): start-up, and each process building only its rows of a batch."""
from __future__ import annotations

import os

import jax
import numpy as np


def initialize_if_asked(asked: bool) -> None:
    """jax.distributed.initialize() when the config asks for it or JAX_COORDINATOR_ADDRESS is set;
    must run before anything touches a device. The process count and id come from
    JAX_NUM_PROCESSES / JAX_PROCESS_ID when set, else from JAX's cluster detection (SLURM, Open
    MPI, Kubernetes, Cloud TPU)."""
    if not (asked or os.environ.get("JAX_COORDINATOR_ADDRESS")) or jax.distributed.is_initialized():
        return
    number = lambda name: int(os.environ[name]) if os.environ.get(name) else None
    jax.distributed.initialize(num_processes=number("JAX_NUM_PROCESSES"),
                               process_id=number("JAX_PROCESS_ID"))


def local_rows(sharding: jax.sharding.Sharding, batch_shape: tuple[int, ...]) -> range:
    """The rows of a batch array of `batch_shape` [B, ...] that this process's devices hold under
    `sharding` (contiguous: the mesh lists each process's devices together)."""
    starts, stops = zip(*(index[0].indices(batch_shape[0])[:2] for index in
                          sharding.addressable_devices_indices_map(batch_shape).values()))
    return range(min(starts), max(stops))


def global_batch(local: dict, sharding: jax.sharding.Sharding, batch_size: int) -> dict:
    """This process's rows of each batch array (numpy) -> global jax.Arrays of batch_size rows."""
    return {key: jax.make_array_from_process_local_data(
        sharding, np.asarray(value), (batch_size, *np.shape(value)[1:]))
        for key, value in local.items()}
