"""experiments/runs.py: a study's runs and their layout, the fairness check, and the chunk loop
(time budget, finished runs skipped, one run per GPU), with the trainer replaced by a stub."""
import json
import threading

import pytest

from experiments import runs
from nsa_jax.train import resolve
from tests.helpers.runs import TINY, tiny_run_config


@pytest.fixture
def twin_config(tmp_path):
    """configs/tiny.py with full attention, as a config file of its own."""
    path = tmp_path / "tiny_full.py"
    path.write_text("import pathlib\nfrom nsa_jax.train import load_config_file\n\n\n"
                    f"def get_config():\n    c = load_config_file({str(TINY)!r})\n"
                    "    c.model.attention = 'full'\n    return c\n")
    return path


def test_study_layout_is_seed_by_seed(tmp_path, twin_config):
    study = runs.study_runs([TINY, twin_config], [3, 5], tmp_path / "out", ["--config.steps=70"])
    assert [r.label for r in study] == ["tiny/seed3", "tiny_full/seed3", "tiny/seed5",
                                        "tiny_full/seed5"]
    assert study[3].workdir == tmp_path / "out" / "tiny_full" / "seed5"
    settings = study[3].settings()
    assert (settings.train.seed, settings.train.steps, settings.model.attention) == (5, 70, "full")


@pytest.mark.parametrize("configs, seeds, overrides, match", [
    ([TINY, TINY], [0], [], "config file names must differ"),
    ([TINY], [], [], "at least one config and one seed"),
    ([TINY], [0], ["--config.stepz=3"], "unknown config key 'stepz'"),
])
def test_bad_studies_are_named(tmp_path, configs, seeds, overrides, match):
    with pytest.raises(ValueError, match=match):
        runs.study_runs(configs, seeds, tmp_path, overrides)


def test_comparable_runs_share_data_optimizer_and_schedule():
    nsa = {seed: resolve(tiny_run_config(seed=seed)) for seed in (0, 1)}
    full = resolve(tiny_run_config(**{"model.attention": "full", "name": "twin"}))
    runs.check_comparable({("a", 0): nsa[0], ("a", 1): nsa[1], ("b", 0): full})
    with pytest.raises(ValueError, match="b/seed0 and a/seed0 differ in their data settings"):
        runs.check_comparable({("a", 0): nsa[0],
                               ("b", 0): resolve(tiny_run_config(**{"data.batch_size": 4}))})
    with pytest.raises(ValueError, match="differ in their train settings"):
        runs.check_comparable({("a", 0): nsa[0], ("b", 0): resolve(tiny_run_config(steps=9))})
    with pytest.raises(ValueError, match="the runs of a differ in their model"):
        runs.check_comparable({("a", 0): nsa[0], ("a", 1): full})


def _finish(workdir, steps):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text("{}")
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": steps, "val_loss": 1.0}) + "\n")


@pytest.fixture
def stub_trainer(monkeypatch):
    """Replaces the trainer subprocess: each call finishes its run (30 steps) and is recorded as
    (workdir name, device, minutes)."""
    calls, lock = [], threading.Lock()

    def train_chunk(config, workdir, overrides, minutes, *, device=None):
        with lock:
            calls.append((f"{workdir.parent.name}/{workdir.name}", device, minutes))
        _finish(workdir, 30)
        return 0

    monkeypatch.setattr(runs, "train_chunk", train_chunk)
    return calls


def test_finished_runs_are_skipped_and_the_rest_trained(tmp_path, twin_config, stub_trainer):
    study = runs.study_runs([TINY, twin_config], [0, 1], tmp_path, ["--config.steps=30"])
    _finish(study[1].workdir, 30)
    assert runs.train_within(study, minutes=5) == []
    assert [(label, device) for label, device, _ in stub_trainer] == [
        ("tiny/seed0", None), ("tiny/seed1", None), ("tiny_full/seed1", None)]
    assert all(0 < minutes <= 5 for _, _, minutes in stub_trainer)
    assert set(runs.study_workdirs(tmp_path)) == {"tiny", "tiny_full"}
    assert list(runs.study_workdirs(tmp_path)["tiny"]) == [0, 1]
    runs.train_within(study, minutes=5)
    assert len(stub_trainer) == 3  # nothing left to start


def test_no_chunk_starts_without_time_for_it(tmp_path, stub_trainer, capsys):
    study = runs.study_runs([TINY], [0], tmp_path, ["--config.steps=30"])
    assert runs.train_within(study, minutes=runs.MIN_CHUNK_MINUTES / 2) == study
    assert stub_trainer == [] and "0 of 1 runs finished; run the same command again" in (
        capsys.readouterr().out)


def test_runs_side_by_side_one_per_gpu(tmp_path, twin_config, stub_trainer):
    study = runs.study_runs([TINY, twin_config], [0, 1, 2], tmp_path, ["--config.steps=30"])
    assert runs.train_within(study, minutes=5, gpus=2) == []
    assert sorted(label for label, _, _ in stub_trainer) == sorted(r.label for r in study)
    assert {device for _, device, _ in stub_trainer} <= {0, 1}


def test_a_failing_trainer_stops_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "train_chunk", lambda *args, **kwargs: 1)
    study = runs.study_runs([TINY], [0], tmp_path, ["--config.steps=30"])
    with pytest.raises(SystemExit, match="tiny/seed0 failed with exit code 1"):
        runs.train_within(study, minutes=5)


class _FinishedTrainer:
    stdout = iter(["step 1/1\n"])

    def poll(self):
        return 0

    def wait(self):
        return 0


def test_a_run_on_one_gpu_sees_only_that_gpu_and_never_the_cpu(tmp_path, monkeypatch, capsys):
    launched = {}

    def popen(cmd, **kwargs):
        launched.update(cmd=cmd, **kwargs)
        return _FinishedTrainer()

    monkeypatch.setattr(runs.subprocess, "Popen", popen)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert runs.train_chunk(TINY, tmp_path, ["--config.steps=1"], 1.0, device=1) == 0
    assert launched["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert launched["env"]["JAX_PLATFORMS"] == "cuda"
    assert launched["cmd"][-3:] == ["--workdir", str(tmp_path), "--config.steps=1"]
    assert "[gpu 1] step 1/1" in capsys.readouterr().out
