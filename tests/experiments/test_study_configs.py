"""Issue 21's study configs: the twins match NSA's parameter count within 1% and differ from it
only where they should, the arms form a fair study, and each retrieval model fits 15 minutes on
one H200 by experiments/budget.py's estimate (whose FLOP count is checked by hand)."""
import dataclasses

import numpy as np
import pytest

from experiments import budget, runs
from nsa_jax.config import ModelConfig, NSAConfig
from nsa_jax.models import num_params
from nsa_jax.train import full_attention_twin, load_config_file, resolve
from tests.helpers.runs import REPO, TINY

CONFIGS = REPO / "configs"
RETRIEVAL = [CONFIGS / f"retrieval_4k_{arm}.py" for arm in ("nsa", "full", "gates_half")]
LM = [CONFIGS / "lm_8k_nsa.py", CONFIGS / "lm_8k_full.py"]


def _model(path):
    return resolve(load_config_file(path)).model


@pytest.mark.parametrize("nsa_path, full_path", [RETRIEVAL[:2], LM])
def test_full_twin_matches_parameters_and_differs_only_in_attention_and_width(nsa_path, full_path):
    nsa, full = _model(nsa_path), _model(full_path)
    assert (nsa.attention, full.attention) == ("nsa", "full")
    assert abs(num_params(full) - num_params(nsa)) <= 0.01 * num_params(nsa)
    assert full.mlp_hidden > nsa.mlp_hidden
    assert dataclasses.replace(full, attention="nsa", mlp_hidden=nsa.mlp_hidden) == nsa


def test_gate_ablation_differs_only_in_gate_init():
    nsa, half = _model(RETRIEVAL[0]), _model(RETRIEVAL[2])
    assert nsa.gate_bias_init == ModelConfig().gate_bias_init and half.gate_bias_init == (0, 0, 0)
    assert dataclasses.replace(half, gate_bias_init=nsa.gate_bias_init) == nsa


@pytest.mark.parametrize("configs", [RETRIEVAL, LM])
def test_study_arms_are_comparable(tmp_path, configs):
    study = runs.study_runs(configs, [0, 1, 2], tmp_path)
    assert len(study) == 3 * len(configs)
    assert resolve(load_config_file(configs[0])).train.loss_normalization == (
        "row" if configs is RETRIEVAL else "token")


@pytest.mark.parametrize("path", RETRIEVAL)
def test_each_retrieval_model_fits_15_minutes_on_one_h200(path):
    seconds = budget.MARGIN * budget.training_seconds(resolve(load_config_file(path)))
    assert seconds + budget.STARTUP_S <= budget.RETRIEVAL_LIMIT_MINUTES * 60


def test_twin_of_a_dense_config_is_refused():
    config = load_config_file(TINY)
    config.model.attention = "window"
    with pytest.raises(ValueError, match="full_attention_twin needs a config with "
                                         "model.attention='nsa'"):
        full_attention_twin(config)


def test_flops_of_a_full_attention_model_by_hand():
    cfg = ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, mlp_hidden=64, attention="full")
    weights = 32 * 32 + 32 * 32 + 32 * 32 + 3 * 32 * 64 + 256 * 32  # q, k+v, out, MLP, logits
    attention = 2 * 2 * (16 + 16) * np.mean([1, 2, 3, 4])  # 2 heads, keys 1..4 at T=4
    assert budget.train_flops_per_token(cfg, 4) == pytest.approx(3 * (2 * weights + attention))


def test_nsa_keys_by_hand():
    nsa = NSAConfig(compress_block=4, compress_stride=2, select_block=4, num_selected=2,
                    num_init_blocks=1, num_local_blocks=1, window=3)
    cfg = ModelConfig(attention="nsa", nsa=nsa)
    # positions 0..9: compressed tokens seen (t >= i*2 + 3): 0,0,0,1,1,2,2,3,3,4; selected keys
    # min(t + 1, 8); window min(t + 1, 3)
    compressed = [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]
    selected = [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]
    window = [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    both, scored = budget.attended_keys(cfg, 10)
    assert both == pytest.approx(np.mean(compressed) + np.mean(selected) + np.mean(window))
    assert scored == pytest.approx(np.mean(compressed))


def test_the_reference_run_is_estimated_at_its_measured_speed():
    run = resolve(load_config_file(CONFIGS / budget.REFERENCES["nsa"].config))
    no_evals = dataclasses.replace(run, train=dataclasses.replace(run.train, eval_batches=1,
                                                                  eval_every=run.train.steps))
    tokens = run.train.steps * run.data.batch_size * run.data.seq_len
    assert budget.training_seconds(no_evals) == pytest.approx(
        tokens / budget.REFERENCES["nsa"].tokens_per_s, rel=0.01)
