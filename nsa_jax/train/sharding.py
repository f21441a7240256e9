"""The device mesh of a run and where every array lives on it.

Mesh axes ("data", "fsdp", "context"): the batch's rows are split over data x fsdp and its
sequences over context (every device gets batch_size / (data x fsdp) rows of seq_len / context
tokens); parameters and optimizer state are split FSDP-style over "fsdp" by `fsdp_spec` and
replicated over "data" and "context". XLA inserts the all-gathers and reduce-scatters inside the
jitted step; NSA attention gathers the K/V of the whole sequence itself (ops.context_parallel).
"""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from nsa_jax.ops.context_parallel import CONTEXT_AXIS
from nsa_jax.train.run_config import AXES, ROW_AXES, MeshSettings

# Arrays smaller than this stay whole on every device: gathering them would cost more time than
# their copies cost memory (norm scales, biases, gates, step counters).
MIN_SHARDED_SIZE = 2**12


def make_mesh(settings: MeshSettings) -> jax.sharding.Mesh:
    """The run's mesh (Auto axes: shardings propagate through jit as in GSPMD)."""
    sizes = settings.sizes(jax.device_count())
    if math.prod(sizes) != jax.device_count() and jax.process_count() > 1:
        raise ValueError(f"config mesh data={settings.data} x fsdp={settings.fsdp} x context="
                         f"{settings.context} must use all {jax.device_count()} devices of a "
                         "multi-process run")
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=jax.devices()[:math.prod(sizes)])


def _mesh_shape(mesh) -> str:
    return " x ".join(f"{name}={mesh.shape[name]}" for name in AXES if name in mesh.shape)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """The batch's rows are split evenly over the data x fsdp devices of the mesh."""
    devices = math.prod(mesh.shape[name] for name in ROW_AXES)
    if batch_size % devices:
        raise ValueError(f"config data.batch_size ({batch_size}) must be divisible by the "
                         f"{devices} devices of mesh {_mesh_shape(mesh)} that split the batch's "
                         f"rows between them; use a multiple of {devices} or change mesh.data / "
                         "mesh.fsdp")


def check_sequence_length(seq_len: int, mesh: jax.sharding.Mesh) -> None:
    """Every sequence is split evenly over the context devices of the mesh."""
    devices = mesh.shape.get(CONTEXT_AXIS, 1)
    if seq_len % devices:
        raise ValueError(f"config data.seq_len ({seq_len}) must be divisible by the {devices} "
                         f"devices of mesh {_mesh_shape(mesh)} that split every sequence between "
                         f"them (mesh.context); use a multiple of {devices} or change mesh.context")


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
    """Every [B, T] batch array: rows over data x fsdp ("data"-major), sequences over context."""
    return NamedSharding(mesh, P(ROW_AXES, CONTEXT_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
