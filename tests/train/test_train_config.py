"""Command-line and config errors: every mistake names what was wrong and what is valid."""
import json

import pytest

from nsa_jax.train import parse_train_args, resolve
from nsa_jax.train.optimizer import learning_rate_schedule, warmup_steps
from nsa_jax.train.workdir import prepare_workdir
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
    ("optimizer.warmup_steps", -1, "warmup_steps"),
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
    with pytest.raises(FileNotFoundError, match="config file 'no_such_config.py' not found") as e:
        parse_train_args(["--config", "no_such_config.py"])
    assert "config_config" not in str(e.value)  # ml_collections' internal flag name
    with pytest.raises(ValueError, match="needs --config"):
        parse_train_args(["--workdir", "/tmp/x"])
    with pytest.raises(ValueError, match="unexpected arguments"):
        parse_train_args(["--config", str(TINY), "stray"])


@pytest.mark.parametrize("text, error", [
    ("def get_config(:\n", "SyntaxError"),
    ("def get_config():\n    raise KeyError('nope')\n", "KeyError: 'nope'"),
    ("x = 1\n", "AttributeError"),
])
def test_config_file_that_fails_to_load_is_named(tmp_path, text, error):
    path = tmp_path / "broken.py"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"config file {path} failed to load: {error}"):
        parse_train_args(["--config", str(path)])


def test_few_steps_cap_the_warm_up():
    """`--config.steps=10` on a config warming up for 20 steps: the warm-up is capped at half
    the run (5 steps), the learning rate peaks there and then decays."""
    config, _ = parse_train_args(["--config", str(TINY), "--config.steps=10"])
    run = resolve(config)
    assert run.optimizer.warmup_steps == 20
    assert warmup_steps(run.optimizer, 10) == 5
    lr = learning_rate_schedule(run.optimizer, 10)
    peak = run.optimizer.learning_rate
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(peak)
    assert float(lr(10)) == pytest.approx(peak * run.optimizer.final_lr_fraction)
    assert warmup_steps(run.optimizer, 150) == 20  # a long enough run keeps its warm-up


def test_changed_config_names_the_keys_that_differ(tmp_path):
    config = json.loads(json.dumps(tiny_run_config().to_dict()))
    prepare_workdir(tmp_path, config)
    bigger = {**config, "steps": 9, "model": {**config["model"], "d_model": 64,
                                             "nsa": {**config["model"]["nsa"], "window": 32}}}
    with pytest.raises(ValueError) as error:
        prepare_workdir(tmp_path, bigger)
    message = str(error.value)
    assert "model.d_model: 32 -> 64" in message and "model.nsa.window: 64 -> 32" in message
    assert "vocab_size" not in message  # only what differs, not both whole configs
    with pytest.warns(UserWarning, match=r"changed config: eval_every: 4 -> 5; steps: 8 -> 9$"):
        prepare_workdir(tmp_path, {**config, "steps": 9, "eval_every": 5})
