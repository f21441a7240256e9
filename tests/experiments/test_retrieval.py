"""experiments/retrieval.py: the selection hit rate on hand-made indices, the grid on random-init
models, the report files, and the errors for bad input."""
import json

import numpy as np
import pytest
from flax import nnx

from experiments import retrieval, retrieval_report
from nsa_jax.config import ModelConfig, NSAConfig
from nsa_jax.data import VOCAB_SIZE, SyntheticExample, passkey_min_length
from nsa_jax.eval.selection import selection_hits
from nsa_jax.models import DecoderLM

# blocks of 8 tokens; block 0 and the query's own and previous block are always selected
CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=4,
                num_init_blocks=1, num_local_blocks=2, window=8)


def _example(answer, evidence, length=64):
    return SyntheticExample(np.zeros(length, np.int32), (answer,), (evidence,))


def _indices(*examples_rows, layers=1, kv_heads=1, length=64):
    """[layers, B, length, kv_heads, 4]: -1 everywhere but row b's {position: blocks}."""
    indices = np.full((layers, len(examples_rows), length, kv_heads, CFG.num_selected), -1,
                      np.int32)
    for b, rows in enumerate(examples_rows):
        for position, blocks in rows.items():
            indices[:, b, position, :, :len(blocks)] = blocks
    return indices


def test_hit_miss_and_needle_straddling_two_blocks():
    # answer tokens 58..59 are predicted at queries 57 and 58 (block 7, so 6 and 7 are forced)
    hit_miss = _example((58, 60), (26, 28))  # key in block 3
    hits, forced = selection_hits(_indices({57: [0, 3, 6, 7], 58: [0, 2, 6, 7]}), [hit_miss], CFG)
    np.testing.assert_array_equal(hits, [[True, False]])
    np.testing.assert_array_equal(forced, [False, False])
    straddle = _example((58, 60), (22, 26))  # key tokens in blocks 2 and 3
    hits, _ = selection_hits(_indices({57: [0, 2, 6, 7], 58: [0, 2, 3, 7]}), [straddle], CFG)
    np.testing.assert_array_equal(hits, [[False, True]])  # one of two blocks is not a hit


def test_forced_hits_layers_and_kv_heads():
    # key at 3: block 0, always chosen; key at 9: block 1, neither init nor local for query 25
    # (block 3), but query 25 sees only 4 blocks, all selected; key at 36: block 4, local for
    # query 47 (block 5) but not for query 48 (block 6)
    start, few = _example((10, 11), (3, 4)), _example((26, 27), (9, 10))
    local = _example((48, 50), (36, 37))
    indices = _indices({9: [0, 1]}, {25: [0, 1, 2, 3]}, {47: [0, 4, 5], 48: [0, 4, 5, 6]},
                       layers=2, kv_heads=2)
    indices[1, 2, 48, 1] = [0, 1, 5, 6]  # layer 1, KV head 1 of query 48 misses block 4
    hits, forced = selection_hits(indices, [start, few, local], CFG)
    # columns: (example, query, KV head) = (0, 9, 0), (0, 9, 1), (1, 25, 0), ... (2, 48, 1)
    np.testing.assert_array_equal(forced, [True] * 6 + [False, False])
    np.testing.assert_array_equal(hits, [[True] * 8, [True] * 7 + [False]])


def test_selection_hits_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[num_layers, B, T, Hkv, n\]"):
        selection_hits(np.zeros((1, 64, 1, 4), np.int32), [_example((58, 60), (26, 28))], CFG)
    with pytest.raises(ValueError, match="has 80 tokens"):
        selection_hits(_indices({}), [_example((58, 60), (26, 28), length=80)], CFG)


def _model_config(attention):
    # blocks of 32: at 96 tokens the queries (90..94) see 3 blocks, all selected (forced); at 128
    # the queries (122..126, block 3) have blocks 0 and 3 forced, and the key digits are tokens
    # 17..21 at depth 0 (block 0: forced), 39..43 at 0.5 and 61..65 at 1 (blocks 1, 1-2: not)
    nsa = NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=3,
                    num_init_blocks=1, num_local_blocks=1, window=16)
    return ModelConfig(vocab_size=VOCAB_SIZE, d_model=32, num_layers=2, num_heads=2,
                       num_kv_heads=2, head_dim=16, mlp_hidden=64, attention=attention, nsa=nsa)


@pytest.fixture(scope="module")
def grid_result():
    """The retrieval.json layout, filled by evaluate_grid on two random-init models."""
    lengths, depths = [96, 128], [0.0, 0.5, 1.0]
    result = {"trained_length": 96, "lengths": lengths, "depths": depths, "examples": 3}
    for kind in ("nsa", "full"):
        cfg = _model_config(kind)
        graphdef, state = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)))
        grid = retrieval.evaluate_grid(retrieval.make_forward(graphdef), state, lengths, depths,
                                       examples=3, batch_size=2, seed=0,
                                       nsa_cfg=cfg.nsa if kind == "nsa" else None)
        result[kind] = {"step": 0, **grid}
    return result


def test_grid_shapes(grid_result):
    for kind in ("nsa", "full"):
        for metric in ("accuracy", "digit_accuracy"):
            assert np.array(grid_result[kind][metric]).shape == (2, 3)
    assert "selection" not in grid_result["full"]
    selection = grid_result["nsa"]["selection"]
    assert selection["queries"] == 3 * 5 * 2  # examples x key digits x KV heads
    for key in ("hits", "unforced_hits", "hit_rate", "unforced_hit_rate"):
        assert np.array(selection[key], dtype=float).shape == (2, 2, 3)
    assert np.array(selection["forced"]).shape == (2, 3)
    np.testing.assert_array_equal(selection["forced_fraction"], [[1, 1, 1], [1, 0, 0]])
    assert all(layer[0] == [None] * 3 and layer[1][0] is None
               for layer in selection["unforced_hit_rate"])
    assert np.all(np.array(selection["hits"]) >= np.array(selection["forced"])[None])
    per_layer = selection["per_layer"]
    assert len(per_layer["hit_rate"]) == 2 and per_layer["forced_fraction"] == pytest.approx(2 / 3)
    assert per_layer["forced_cells"] == 4 and per_layer["cells"] == 6


def _seed_results(grid_result):
    """{arm: {seed: retrieval.json}}: the random-init grids as seed 0, and as seed 1 with every
    exact-match value 0.1 higher."""
    results = {}
    for arm in ("nsa", "full"):
        common = {k: grid_result[k] for k in ("trained_length", "lengths", "depths", "examples")}
        base = {**common, **grid_result[arm], "eval_seed": 0, "params": 1000, "step": 8}
        shifted = {**base, "accuracy": (np.array(base["accuracy"]) + 0.1).tolist()}
        results[arm] = {0: base, 1: shifted}
    return results


def test_summary_aggregates_seeds(grid_result):
    results = _seed_results(grid_result)
    text = "\n".join(retrieval_report.summary_table(results, "accuracy"))
    by_length = np.mean(grid_result["nsa"]["accuracy"], axis=1)
    row = next(line for line in text.splitlines() if line.startswith("| nsa |"))
    first = f"{by_length[0] + 0.05:.3f} ± {np.std([0, 0.1], ddof=1):.3f}"
    assert first in row and f"({by_length[0]:.3f}, {by_length[0] + 0.1:.3f})" in row
    assert "| nsa | 0.001M | 0, 1 | 8 |" in row and "96 (1x)" in text and "128 (1.33x)" in text
    table = "\n".join(retrieval_report.arm_table(results, "full", "digit_accuracy"))
    assert f"{grid_result['full']['digit_accuracy'][1][2]:.3f}" in table
    selection = "\n".join(retrieval_report.selection_tables(results, "nsa"))
    assert "| 1 |" in selection and "4 of 6 cells are entirely forced" in selection


def test_report_refuses_mixed_grids(grid_result, tmp_path):
    results = _seed_results(grid_result)
    results["full"][1]["examples"] = 7
    for arm, seeds in results.items():
        for seed, result in seeds.items():
            (tmp_path / arm / f"seed{seed}").mkdir(parents=True)
            (tmp_path / arm / f"seed{seed}" / "config.json").write_text("{}")
            (tmp_path / arm / f"seed{seed}" / "retrieval.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="evaluated on different grids"):
        retrieval_report.load_results(tmp_path)


@pytest.mark.parametrize("lengths,depths,examples,match", [
    ([passkey_min_length(5) - 1], [0.5], 4, "--lengths must be context lengths >= "),
    ([256], [-0.1, 0.5], 4, r"--depths must be needle depths in \[0, 1\]"),
    ([256], [1.5], 4, r"--depths must be needle depths in \[0, 1\]"),
    ([256], [0.5], 0, "--examples must be >= 1"),
])
def test_check_grid_names_the_bad_setting(lengths, depths, examples, match):
    with pytest.raises(ValueError, match=match):
        retrieval.check_grid(lengths, depths, examples, batch_size=2)


def test_missing_runs_and_results_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="no runs in .*train first"):
        retrieval.main(["eval", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no OUT/<config>/seed<k>/retrieval.json .* eval"):
        retrieval.main(["report", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="config file .*nope.py not found"):
        retrieval.main(["train", "--configs", str(tmp_path / "nope.py"), "--out", str(tmp_path)])
    assert not (tmp_path / "commands.jsonl").exists()  # failed commands are not recorded
