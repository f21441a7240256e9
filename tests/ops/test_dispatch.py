"""The dispatch table (nsa_jax.ops.dispatch): what runs for each op, implementation and backend,
and implementation="pallas" through the public ops — the kernels (interpret mode on CPU) where
they exist, xla for the rest — with the oracle's answers."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops
from nsa_jax.ops import dispatch
from tests.helpers.inputs import SMALL, make_qkv, random_segments, rel_err


def _chains():
    """(op, implementation, backend, [(condition, target)]) of every cell."""
    for op, row in dispatch.TABLE.items():
        for name, cells in row.items():
            if name is None:
                continue
            for on in dispatch.BACKENDS:
                cell = cells.get(on, cells.get("*"))
                yield op, name, on, [(dispatch.always, cell)] if isinstance(cell, str) else cell


def test_every_cell_names_importable_targets_and_ends_in_an_unconditional_one():
    for op, name, on, chain in _chains():
        assert chain[-1][0] is dispatch.always, (op, name, on)
        for _, target in chain:
            assert callable(dispatch.load(target)), target
    for op, row in dispatch.TABLE.items():
        assert set(row[None]) == set(dispatch.BACKENDS) and set(row[None].values()) <= set(row)


def test_missing_implementation_says_what_can_run(monkeypatch):
    row = {name: cells for name, cells in dispatch.TABLE["window_attention"].items()
           if name != "reference"}
    monkeypatch.setattr(dispatch, "TABLE", {**dispatch.TABLE, "window_attention": row})
    x = jnp.zeros((1, 32, 2, 8))
    with pytest.raises(ValueError, match=r"window_attention has no 'reference' implementation; it "
                                         r"can run \['xla', 'pallas'\]"):
        ops.window_attention(x, x, x, SMALL, implementation="reference")


@pytest.mark.parametrize("capability, expected", [("9.0", "hopper"), ("8.0", "gpu")])
def test_backend_probe_tells_hopper_from_older_gpus(monkeypatch, capability, expected):
    class Device:
        compute_capability = capability

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [Device()])
    assert dispatch.backend() == expected


def test_conditional_fallbacks():
    """Float64 and packed or 32-bit window inputs fall back to xla; kernels where they fit."""
    half = jnp.zeros((1, 32, 2, 16), jnp.bfloat16)
    wide = types.SimpleNamespace(shape=half.shape, dtype=np.dtype("float64"))  # x64 is off here
    window = lambda x, **kw: dispatch.choose("window_attention", "pallas", (x, x, x, SMALL), kw,
                                             on="gpu")
    assert window(half) == dispatch.WIN + "window_attention_cudnn"
    assert window(half, segment_ids=jnp.zeros((1, 32), jnp.int32)).endswith("_xla")
    assert window(half.astype(jnp.float32)).endswith("_xla")
    assert dispatch.choose("window_attention", "pallas", (half, half, half, SMALL), {},
                           on="cpu").endswith("_xla")
    f16 = half.astype(jnp.float16)
    indices = jnp.zeros((1, 32, 2, 4), jnp.int32)
    selected = lambda x, on: dispatch.choose("selected_attention", None,
                                             (x, x, x, indices, SMALL), {}, on=on)
    assert selected(half, "hopper").startswith(dispatch.MOSAIC)
    assert selected(f16, "hopper").startswith(dispatch.MOSAIC)
    assert selected(half.astype(jnp.float32), "hopper").startswith(dispatch.TRITON)
    assert selected(f16, "gpu").endswith("_xla") and selected(half, "cpu").endswith("_xla")
    for op in ("compressed_attention", "select", "selected_attention", "nsa_decode"):
        assert dispatch.choose(op, "pallas", (wide,), {}, on="gpu").endswith("_xla"), op
    one = half[:, 0]  # one query per sequence over the cache `half`
    dense = lambda q, on="hopper", **kw: dispatch.choose(
        "dense_decode", None, (q, half, half, jnp.zeros((1,), jnp.int32)), kw, on=on)
    assert dense(one) == dispatch.DEC + "dense_decode_cudnn"
    assert dense(one, window=8).endswith("_xla") and dense(one, on="cpu").endswith("_xla")
    assert dense(one.astype(jnp.float32)).endswith("_xla")


def test_ops_import_no_kernel_until_pallas_is_asked_for():
    code = ("import sys, jax.numpy as jnp\n"
            "from nsa_jax import NSAConfig, ops\n"
            "x = jnp.ones((1, 64, 2, 8))\n"
            "ops.nsa_attention(x, x[:, :, :1], x[:, :, :1], jnp.ones((1, 64, 2, 3)), NSAConfig("
            "compress_block=8, compress_stride=4, select_block=16, num_selected=4, window=8), "
            "implementation='xla')\n"
            "assert not [m for m in sys.modules if m.startswith('pallas_kernels')], 'imported'\n")
    root = pathlib.Path(__file__).resolve().parents[2]  # `python -c` imports from its cwd first
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr


def test_nsa_attention_pallas_matches_reference(key):
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v, gates = make_qkv(k1, 1, 96, 4, 2, 16)
    seg = random_segments(k2, 1, 96)
    ct = jax.random.normal(k3, q.shape)

    def run(impl):
        def loss(q, k, v, g):
            out, aux = ops.nsa_attention(q, k, v, g, SMALL, segment_ids=seg, implementation=impl,
                                         return_aux=True)
            return jax.numpy.sum(out * ct), (out, aux["indices"])
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(q, k, v, gates)

    (_, (out, idx)), grads = run("pallas")
    (_, (want, want_idx)), want_grads = run("reference")
    np.testing.assert_array_equal(idx, want_idx)
    assert rel_err(out, want) <= 1e-5
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) <= 1e-5
