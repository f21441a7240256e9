"""Context parallelism: the query-offset argument of the xla and reference ops, the sequence
layouts, and (in a subprocess with 8 simulated CPU devices, tests/ops/context_parallel_runs.py)
nsa_attention on 2, 4 and 8 context devices against one device."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops
from nsa_jax.ops import context_parallel, dispatch
from nsa_jax.ops.context_parallel import device_chunks, from_layout, layout_order, to_layout
from tests.helpers.inputs import SMALL, make_qkv, random_segments, rel_err
from tests.helpers.runs import REPO

TOL = 1e-5
SHARDED_OPS = ("compressed_attention", "select", "selected_attention", "window_attention")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("context") / "results.json"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "ops" / "context_parallel_runs.py"),
                           str(out)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_sharded_nsa_attention_equals_one_device(runs):
    assert len(runs["cases"]) == 5
    for case, found in runs["cases"]:
        assert found.pop("all_gather"), case
        assert found.pop("indices") == 0.0, case
        assert len(found) == 6 + 2 * case[4], case  # out, lse and every gradient were compared
        assert max(found.values()) <= TOL, (case, found)


def test_shards_that_do_not_split_are_clear_errors(runs):
    assert "batch size 2 must be divisible by 4" in runs["batch"]
    assert "'data': 4" in runs["batch"]
    assert "context_layout='zigzag' cuts the sequence in 16 chunks" in runs["sequence"]
    assert "length 56 must be divisible by 16" in runs["sequence"]


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_query_offset_gives_the_rows_of_the_whole_sequence(key, implementation):
    """Every op a context-parallel device runs, on a shard of the queries, against the same op on
    all of them: a shard inside the first query chunk and one over several (xla: chunks of 256).
    select and selected_attention take the whole run's lse and indices rows, so each op is
    compared on the same inputs."""
    t = 300 if implementation == "xla" else 72
    q, k, v, _ = make_qkv(key, 1, t, 4, 2, 8)
    k_cmp, v_cmp = (jax.random.normal(key, (1, t // SMALL.compress_stride, 2, 8)) for key in
                    jax.random.split(key))
    seg = random_segments(key, 1, t)

    def branches(q, offset=None, lse=None, indices=None):
        shard = {} if offset is None else {"query_offset": offset}
        kw = dict(segment_ids=seg, scale=0.3, **shard)
        run = lambda op, *args: dispatch.run(op, implementation, *args, SMALL, **kw)
        o_cmp, own_lse = run("compressed_attention", q, k_cmp, v_cmp)
        own_indices = run("select", q, k_cmp, own_lse if lse is None else lse)
        indices = own_indices if indices is None else indices
        return (o_cmp, own_lse, own_indices, run("selected_attention", q, k, v, indices),
                run("window_attention", q, k, v))

    whole = jax.jit(branches)(q)
    for start, stop in ((24, 64), (20, t)):
        rows = lambda x: x[:, start:stop]
        got = jax.jit(branches)(rows(q), jnp.int32(start), rows(whole[1]), rows(whole[2]))
        for name, g, w in zip(("o_cmp", "lse", "indices", "o_slc", "o_win"), got, whole):
            assert rel_err(g, rows(w)) <= TOL, (name, start, stop)


def test_query_offset_needs_segment_ids():
    q = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="query_offset needs segment_ids"):
        dispatch.run("window_attention", "xla", q, q, q, SMALL, scale=1.0, query_offset=0)


def test_every_cell_sends_query_shards_to_a_target_that_takes_them():
    x = jnp.zeros((1, 32, 2, 16), jnp.bfloat16)
    for op in SHARDED_OPS:
        for implementation in dispatch.TABLE[op]:
            for on in dispatch.BACKENDS:
                target = dispatch.choose(op, implementation, (x, x, x, SMALL),
                                         {"query_offset": 0}, on=on)
                parameters = inspect.signature(dispatch.load(target),
                                               follow_wrapped=False).parameters
                assert "query_offset" in parameters, (op, implementation, on, target)


def test_layouts_cut_the_sequence_into_chunks():
    assert device_chunks("plain", 3) == ((0,), (1,), (2,))
    assert device_chunks("zigzag", 3) == ((0, 5), (1, 4), (2, 3))
    np.testing.assert_array_equal(layout_order(8, "zigzag", 2), [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(layout_order(8, "plain", 4), np.arange(8))
    np.testing.assert_array_equal(layout_order(8, "zigzag", 1), np.arange(8))  # one device
    x = jnp.arange(2 * 24).reshape(2, 24)
    np.testing.assert_array_equal(to_layout(x, "zigzag", 3)[:, :4], x[:, [0, 1, 2, 3]])
    np.testing.assert_array_equal(to_layout(x, "zigzag", 3)[:, 4:8], x[:, 20:24])
    np.testing.assert_array_equal(from_layout(to_layout(x, "zigzag", 3), "zigzag", 3), x)


def test_bad_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="context_layout must be one of .*'striped'"):
        device_chunks("striped", 2)
    with pytest.raises(ValueError, match="length 12 must be divisible by 8"):
        layout_order(12, "zigzag", 4)


def test_without_a_context_axis_nothing_is_split():
    assert context_parallel.context_size() == 1
    q, k, v, gates = make_qkv(jax.random.PRNGKey(0), 1, 32, 2, 1, 8)
    plain = ops.nsa_attention(q, k, v, gates, SMALL)
    np.testing.assert_array_equal(ops.nsa_attention(q, k, v, gates, SMALL,
                                                    context_layout="zigzag"), plain)
