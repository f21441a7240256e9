"""nsa-eval on a trained shrunk tiny run: JSON and PNG with loss by length and the passkey grid."""
import json

import pytest

from nsa_jax.eval import evaluate_workdir, parse_eval_args
from nsa_jax.eval.report import passkey_title


def test_eval_writes_json_and_heat_map(tiny_run):
    workdir, summary = tiny_run
    config, parsed_workdir = parse_eval_args(["--workdir", str(workdir),
                                              "--config.eval.passkey_depths=(0.0, 0.5, 1.0)"])
    assert parsed_workdir == str(workdir)
    result = evaluate_workdir(config, workdir)
    stored = json.loads((workdir / "eval.json").read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["step"] == summary["step"] == 8
    assert [row["length"] for row in stored["loss_by_length"]] == [32, 64]
    for row in stored["loss_by_length"]:
        assert 0 < row["val_loss"] < 6 and row["val_perplexity"] > 1 and row["val_tokens"] > 0
    passkey = stored["passkey"]
    assert passkey["lengths"] == [96] and passkey["depths"] == [0.0, 0.5, 1.0]
    assert len(passkey["accuracy"]) == 1 and len(passkey["accuracy"][0]) == 3
    assert all(0.0 <= a <= 1.0 for a in passkey["accuracy"][0])
    assert passkey["trained_on_passkeys"] is False  # configs/tiny.py: data.passkey_prob = 0
    assert "never saw passkey data" in passkey_title(passkey)
    assert "never" not in passkey_title({**passkey, "trained_on_passkeys": True})
    assert (workdir / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_errors(tiny_run, tmp_path):
    workdir, _ = tiny_run
    with pytest.raises(FileNotFoundError, match="config.json"):
        parse_eval_args(["--workdir", str(tmp_path)])
    with pytest.raises(ValueError, match="valid keys of config.eval"):
        parse_eval_args(["--workdir", str(workdir), "--config.eval.lenghts=(32,)"])
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    config, _ = parse_eval_args(["--workdir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate_workdir(config, tmp_path)
