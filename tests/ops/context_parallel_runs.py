"""Runs for tests/ops/test_context_parallel.py in a process of its own, with 8 simulated CPU devices
(the device count must be set before JAX starts, so these cannot share the pytest process).

    python tests/ops/context_parallel_runs.py OUT.json

nsa_attention's output, aux and gradients (q, k, v, gates, and the learned-compressor K/V when
given) on a context axis of 2, 4 and 8 devices, plain and zigzag, packed and unpacked, against the
same jitted function without a mesh; whether the sharded trace holds a shard_map with an
all-gather over "context"; the errors for batches and sequences that do not split.
"""
from __future__ import annotations

import functools
import json
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from nsa_jax import ops  # noqa: E402
from nsa_jax.ops import context_parallel  # noqa: E402
from tests.helpers.inputs import SMALL, make_qkv, random_segments, rel_err  # noqa: E402

B, T, HQ, HKV, D = 2, 64, 4, 2, 8  # T / 16 = 4 tokens per zigzag chunk on 8 devices: l = 8 > 4
# (context devices, layout, packed, implementation, compressed K/V given): every device count,
# both layouts and packings, learned-compressor K/V once; few, because every case compiles a
# sharded gradient (the oracle's query offsets are checked in-process, test_context_parallel.py)
CASES = [(2, "zigzag", True, "xla", False), (4, "plain", True, "xla", False),
         (8, "zigzag", False, "xla", False), (8, "plain", True, "xla", False),
         (2, "plain", False, "xla", True)]


def context_mesh(devices: int, rows: int = 1):
    return jax.make_mesh((rows, devices), ("data", context_parallel.CONTEXT_AXIS),
                         axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:rows * devices])


def inputs(packed: bool, compressed: bool):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v, gates = make_qkv(keys[0], B, T, HQ, HKV, D)
    segment_ids = random_segments(keys[1], B, T) if packed else None
    slots = SMALL.num_compressed(T) if not packed else T // SMALL.compress_stride
    k_cmp, v_cmp = (jax.random.normal(key, (B, slots, HKV, D)) for key in jax.random.split(keys[2]))
    return (q, k, v, gates, *((k_cmp, v_cmp) if compressed else ())), segment_ids


def step(layout: str, implementation: str, segment_ids):
    """Jitted (out, aux, gradients) of a sin-weighted sum of nsa_attention's output."""
    def loss(q, k, v, gates, *compressed):
        extra = dict(zip(("k_cmp", "v_cmp"), compressed))
        out, aux = ops.nsa_attention(q, k, v, gates, SMALL, segment_ids=segment_ids,
                                     implementation=implementation, return_aux=True,
                                     context_layout=layout, **extra)
        return jnp.sum(jnp.sin(out)), (out, aux)

    return jax.jit(lambda *arrays: jax.grad(loss, argnums=tuple(range(len(arrays))),
                                            has_aux=True)(*arrays))


@functools.cache
def one_device(packed: bool, implementation: str, compressed: bool):
    """The unsharded results (the layout only matters on a context axis)."""
    arrays, segment_ids = inputs(packed, compressed)
    return jax.device_get(step("plain", implementation, segment_ids)(*arrays))


def errors(case) -> dict:
    """Largest relative error of every output and gradient, sharded vs one device."""
    devices, layout, packed, implementation, compressed = case
    arrays, segment_ids = inputs(packed, compressed)
    want = one_device(packed, implementation, compressed)
    to = lambda x: context_parallel.to_layout(x, layout, devices)
    back = lambda x: context_parallel.from_layout(x, layout, devices)
    sequence = [to(x) for x in arrays[:4]] + list(arrays[4:])  # k_cmp/v_cmp keep their slots
    sharded_ids = None if segment_ids is None else to(segment_ids)
    with jax.set_mesh(context_mesh(devices)):
        sharded = step(layout, implementation, sharded_ids)
        trace = str(jax.make_jaxpr(sharded)(*sequence))
        grads, (out, aux) = jax.device_get(sharded(*sequence))
    grads = [back(g) for g in grads[:4]] + list(grads[4:])
    found = {"out": rel_err(back(out), want[1][0]),
             "lse_cmp": rel_err(back(aux["lse_cmp"]), want[1][1]["lse_cmp"]),
             "indices": float(np.mean(back(aux["indices"]) != want[1][1]["indices"]))}
    names = ("q", "k", "v", "gates", "k_cmp", "v_cmp")
    found.update({f"d{name}": rel_err(g, w) for name, g, w in zip(names, grads, want[0])})
    found["all_gather"] = "all_gather" in trace and "shard_map" in trace
    return found


def split_errors() -> dict:
    """The messages for a batch the other axes cannot split and a sequence that does not cut."""
    (q, k, v, gates), _ = inputs(False, False)
    messages = {}
    for name, mesh, length in (("batch", context_mesh(2, rows=4), T),
                               ("sequence", context_mesh(8), 56)):
        with jax.set_mesh(mesh):
            try:
                cut = lambda x: x[:, :length]
                ops.nsa_attention(cut(q), cut(k), cut(v), cut(gates), SMALL,
                                  context_layout="zigzag")
            except ValueError as error:
                messages[name] = str(error)
    return messages


def main(out: str) -> None:
    results = {"cases": [], **split_errors()}
    for case in CASES:
        started = time.perf_counter()
        results["cases"].append([list(case), errors(case)])
        print(case, f"{time.perf_counter() - started:.0f} s", results["cases"][-1][1], flush=True)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
