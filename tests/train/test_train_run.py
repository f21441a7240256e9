"""The real tiny config, shrunk, trained in a temp workdir: files, metrics, resume, NaN abort,
SIGTERM, a corrupt newest checkpoint."""
import json
import os
import signal

import jax.numpy as jnp
import pytest

from nsa_jax.data import make_train_batch
from nsa_jax.models import mean_loss
from nsa_jax.train import Interrupted, TrainingDiverged, loop, resolve, train
from nsa_jax.train.trained_run import new_model
from tests.helpers.runs import losses, tiny_run_config


@pytest.fixture
def trained(tiny_run):
    return tiny_run


def test_run_writes_metrics_plot_config_and_checkpoints(trained):
    workdir, summary = trained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 9))
    for r in records:
        if "loss" in r:
            assert {"learning_rate", "tokens_per_s", "grad_norm", "gate_cmp", "gate_slc",
                    "gate_win"} <= set(r)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert summary["step"] == 8 and summary["eval"]["val_loss"] == evals[-1]["val_loss"]
    assert (workdir / "loss.png").stat().st_size > 0
    assert json.loads((workdir / "config.json").read_text())["model"]["nsa"]["window"] == 64
    assert json.loads((workdir / "run_info.json").read_text())["packages"]["jax"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8]


def test_finished_run_resumes_to_nothing(trained):
    workdir, _ = trained
    before = losses(workdir)
    assert train(tiny_run_config(), workdir)["step"] == 8
    assert losses(workdir) == before


def test_corrupt_newest_checkpoint_is_skipped_and_training_repeats_identically(
        trained, tmp_path):
    workdir, _ = trained
    copy = tmp_path / "run"
    os.system(f"cp -r {workdir} {copy}")
    for path in (copy / "checkpoints" / "8").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step 8 could not be restored"):
        train(tiny_run_config(), copy)
    assert (copy / "corrupt_checkpoints" / "8").is_dir()
    assert losses(copy) == losses(workdir)


def test_changed_model_config_refuses_to_resume(trained):
    workdir, _ = trained
    with pytest.raises(ValueError, match="'model' config differs"):
        train(tiny_run_config(**{"model.d_model": 64}), workdir)


def test_nan_loss_aborts_with_a_message(tmp_path, monkeypatch):
    new_model = loop.new_model

    def poisoned_model(run):
        model = new_model(run)
        model.embed.embedding[...] = model.embed.embedding[...].at[:, 0].set(jnp.nan)
        return model

    monkeypatch.setattr(loop, "new_model", poisoned_model)
    with pytest.raises(TrainingDiverged, match="diverged at step 1: loss nan"):
        train(tiny_run_config(), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
    def batch_then_signal(data, seed, step, rows=None):
        if step == 3:  # delivered to this (the main) thread while step 3 is being prepared
            os.kill(os.getpid(), signal.SIGTERM)
        return make_train_batch(data, seed, step, rows)

    monkeypatch.setattr(loop, "make_train_batch", batch_then_signal)
    with pytest.raises(Interrupted) as stop:
        train(tiny_run_config(), tmp_path)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4]
    assert max(losses(tmp_path)) == 4


def test_row_normalization_is_the_loss_the_trainer_minimises(tmp_path):
    """Step 1's logged loss is the initial model's loss on batch 0, averaged by rows as asked."""
    config = tiny_run_config(steps=1, loss_normalization="row", **{
        "optimizer.warmup_steps": 0, "data.passkey_prob": 0.5, "data.mqar_prob": 0.25,
        "data.mqar_num_pairs": 2, "data.batch_size": 4, "data.seq_len": 96})
    train(config, tmp_path)
    run = resolve(config)
    batch = make_train_batch(run.data, run.train.seed, 0)
    assert batch["loss_mask"].sum(1).min() < 25 < batch["loss_mask"].sum(1).max()  # mixed rows
    expected = {norm: float(mean_loss(new_model(run), batch, norm)[0]) for norm in ("row", "token")}
    assert losses(tmp_path)[1] == pytest.approx(expected["row"], rel=1e-5)
    assert abs(expected["row"] - expected["token"]) > 1e-3
