"""experiments/long_context_check.py at CPU sizes (--smoke): both stages pass in their
subprocesses with a table and JSON under $OUT, and a stage fails when the op's rows are shifted by
one (so its check can fail)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import long_context_check


@pytest.mark.slow  # two fresh Pythons compile the whole op forward and backward
def test_smoke_run_passes_and_writes_its_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert long_context_check.main(["--smoke"]) == 0
    records = json.loads((tmp_path / "long_context_check.json").read_text())
    assert [(r["stage"], r["T"], r["ok"]) for r in records] == [("backward", 384, True),
                                                               ("forward", 512, True)]
    assert set(records[0]["errors"]) == {"out", "dq", "dgates", "dk", "dv"}
    assert records[0]["dq_zero_elsewhere"] and all(r["ms"] > 0 for r in records)
    assert "| backward | 384 | PASS |" in capsys.readouterr().out
    assert (tmp_path / "long_context_forward.log").exists()


def test_a_wrong_op_fails(monkeypatch):
    real = long_context_check.ops.nsa_attention

    def shifted(*args, **kwargs):
        out, aux = real(*args, **kwargs)
        return jnp.roll(out, 1, axis=1), aux

    monkeypatch.setattr(long_context_check.ops, "nsa_attention", shifted)
    record = long_context_check.run_stage("forward", long_context_check.parse_args(["--smoke"]))
    assert not record["ok"] and record["errors"]["out"] > long_context_check.TOLERANCE
    assert "ms" not in record  # no timing of a wrong op


def test_random_normal_in_chunks_matches_shape_and_varies(monkeypatch):
    monkeypatch.setattr(long_context_check, "_CHUNK_ELEMENTS", 64)
    x = long_context_check.random_normal(long_context_check.jax.random.PRNGKey(0), (1, 32, 2, 4))
    assert x.shape == (1, 32, 2, 4) and x.dtype == jnp.bfloat16
    rows = x.reshape(32, 8).astype(jnp.float32)
    assert not bool(jnp.all(rows[:8] == rows[8:16]))  # chunks draw different values


@pytest.mark.parametrize("t, rows", [(384, 8), (20, 8), (5, 8), (1000, 1)])
def test_row_slices_are_disjoint_and_ascend(t, rows):
    slices = long_context_check.row_slices(t, rows)
    joined = np.concatenate(list(slices.values()))
    expected = np.unique(np.concatenate([np.arange(rows), t // 2 - rows // 2 + np.arange(rows),
                                         t - rows + np.arange(rows)]).clip(0, t - 1))
    np.testing.assert_array_equal(joined, expected)  # every row once, in order
    assert list(slices)[0] == "first" and all(part.size for part in slices.values())


def test_stages_past_the_budget_are_stopped_and_reported(tmp_path, monkeypatch, capsys):
    """--budget-s 4: each stage's Python gets 2 s, too little to import JAX and compile; both
    are stopped, reported as FAIL, and the JSON under $OUT holds both records."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert long_context_check.main(["--smoke", "--budget-s", "4"]) == 1
    records = json.loads((tmp_path / "long_context_check.json").read_text())
    assert [r["stage"] for r in records] == ["backward", "forward"]
    assert all(not r["ok"] and r["crashed"].startswith("stopped at its") for r in records)
    out = capsys.readouterr().out
    assert "start stage backward (limit 2 s)" in out and "stopping it (SIGTERM)" in out
