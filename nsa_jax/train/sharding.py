"""The device mesh of a run and where every array lives on it.

Mesh axes ("data", "fsdp"): the batch is split over both (every device gets batch_size / devices
rows); parameters and optimizer state are split FSDP-style over "fsdp" by `fsdp_spec` and
replicated over "data". XLA inserts the all-gathers and reduce-scatters inside the jitted step.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from nsa_jax.train.run_config import AXES, MeshSettings

# Arrays smaller than this stay whole on every device: gathering them would cost more time than
# their copies cost memory (norm scales, biases, gates, step counters).
MIN_SHARDED_SIZE = 2**12


def make_mesh(settings: MeshSettings) -> jax.sharding.Mesh:
    """The run's mesh (Auto axes: shardings propagate through jit as in GSPMD)."""
    sizes = settings.sizes(jax.device_count())
    if math.prod(sizes) != jax.device_count() and jax.process_count() > 1:
        raise ValueError(f"config mesh data={settings.data} x fsdp={settings.fsdp} must use all "
                         f"{jax.device_count()} devices of a multi-process run")
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=jax.devices()[:math.prod(sizes)])


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """The batch is split evenly over every device of the mesh."""
    if batch_size % mesh.size:
        shape = " x ".join(f"{name}={mesh.shape[name]}" for name in AXES)
        raise ValueError(f"config data.batch_size ({batch_size}) must be divisible by the "
                         f"{mesh.size} devices of mesh {shape}, which split the batch between "
                         f"them; use a multiple of {mesh.size} or change mesh.data / mesh.fsdp")


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """The FSDP rule: split the largest dimension that `fsdp` divides (the first of equals) over
    the "fsdp" axis; replicate arrays below MIN_SHARDED_SIZE and arrays no dimension of which
    fsdp divides."""
    divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE or not divisible:
        return P()
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return P(*(("fsdp" if i == axis else None) for i in range(len(shape))))


def state_shardings(state, mesh: jax.sharding.Mesh):
    """A pytree of NamedSharding matching `state` (arrays or ShapeDtypeStructs) by `fsdp_spec`."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape["fsdp"])),
                        state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows of every [B, ...] batch array over all devices, "data"-major."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
