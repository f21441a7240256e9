"""Command-line and config errors: every mistake names what was wrong and what is valid."""
import pytest

from nsa_jax.train import parse_train_args, resolve
from tests.helpers.runs import TINY, tiny_run_config


def test_defaults_workdir_to_runs_name_and_applies_overrides():
    config, workdir = parse_train_args(["--config", str(TINY), "--config.steps=70",
                                        "--config.model.nsa.window=32"])
    assert workdir == "runs/tiny"
    assert config.steps == 70 and config.model.nsa.window == 32
    run = resolve(config)
    assert run.train.steps == 70 and run.model.nsa.window == 32 and run.model.attention == "nsa"


def test_workdir_flag():
    _, workdir = parse_train_args(["--config", str(TINY), "--workdir", "/tmp/elsewhere"])
    assert workdir == "/tmp/elsewhere"


@pytest.mark.parametrize("arg, names", [
    ("--config.stepz=5", ["'stepz'", "steps", "log_every", "model"]),
    ("--config.model.dmodel=64", ["'model.dmodel'", "d_model", "num_heads"]),
    ("--config.model.nsa.windw=64", ["'model.nsa.windw'", "window", "select_block"]),
])
def test_misspelt_override_names_the_valid_keys(arg, names):
    with pytest.raises(ValueError) as error:
        parse_train_args(["--config", str(TINY), arg])
    for name in names:
        assert name in str(error.value)


def test_override_of_wrong_type_is_an_error():
    with pytest.raises(ValueError, match="steps"):
        parse_train_args(["--config", str(TINY), "--config.steps=many"])


@pytest.mark.parametrize("key, value, message", [
    ("steps", 0, "steps must be an int >= 1"),
    ("loss_normalization", "document", r"loss_normalization must be one of \('token', 'row'\)"),
    ("model.attention", "sparse", "attention must be one of"),
    ("model.nsa.num_selected", 2, "num_selected"),
    ("model.gate_bias_init", (0.0, 0.0), r"gate_bias_init must be 3 numbers \(cmp, slc, win\)"),
    ("model.gate_bias_init", (0.0, float("inf"), 0.0), "gate_bias_init must be a number"),
    ("optimizer.learning_rate", -1.0, "learning_rate"),
    ("optimizer.warmup_steps", 8, "warmup_steps"),
    ("data.corpora", "wikipedia", "allowed names"),
    ("eval.passkey_depths", (0.5, 2.0), "passkey_depths"),
])
def test_bad_values_are_clear_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        resolve(tiny_run_config(**{key: value}))


def test_unknown_key_inside_a_config_file_names_the_valid_keys():
    config = tiny_run_config()
    config.unlock()
    config.optimizer.lr = 1e-3
    with pytest.raises(ValueError, match=r"\['lr'\].*valid keys.*learning_rate"):
        resolve(config)


def test_missing_config_file_and_missing_flag():
    with pytest.raises(FileNotFoundError, match="no_such_config.py"):
        parse_train_args(["--config", "no_such_config.py"])
    with pytest.raises(ValueError, match="needs --config"):
        parse_train_args(["--workdir", "/tmp/x"])
    with pytest.raises(ValueError, match="unexpected arguments"):
        parse_train_args(["--config", str(TINY), "stray"])
