"""Issue 21's two studies end to end on the CPU, on their real config files shrunk to toy size
(a 2-layer model, 4 steps, 2 seeds): train in trainer subprocesses (two side by side for the
language-modelling study, as on two GPUs), start nothing when finished, evaluate the retrieval
grid once, and write the reports with their provenance."""
import json

import pytest

from experiments import nsa_vs_full, retrieval
from tests.helpers.runs import REPO, share_compilations

TOY = ["--config.steps=4", "--config.log_every=2", "--config.eval_every=4",
       "--config.eval_batches=1", "--config.checkpoint_every=2",
       "--config.optimizer.warmup_steps=1", "--config.data.seq_len=128",
       "--config.data.batch_size=2", "--config.model.d_model=32", "--config.model.num_layers=2",
       "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
       "--config.model.head_dim=16", "--config.model.v_head_dim=16",
       "--config.model.mlp_hidden=64", "--config.model.dtype=float32",
       "--config.model.implementation=reference", "--config.model.nsa.compress_block=16",
       "--config.model.nsa.compress_stride=8", "--config.model.nsa.select_block=32",
       "--config.model.nsa.num_selected=3", "--config.model.nsa.num_local_blocks=1",
       "--config.model.nsa.window=32"]
RETRIEVAL = [str(REPO / "configs" / f"retrieval_4k_{arm}.py") for arm in
             ("nsa", "full", "gates_half")]
LM = [str(REPO / "configs" / f"lm_8k_{arm}.py") for arm in ("nsa", "full")]


@pytest.fixture(autouse=True)
def shared_compilations(tmp_path_factory, monkeypatch):
    for name, value in share_compilations(tmp_path_factory.getbasetemp() / "jax_cache").items():
        monkeypatch.setenv(name, value)


def test_retrieval_study(tmp_path, capsys):
    out = tmp_path / "retrieval"
    train = ["train", "--out", str(out), "--seeds", "0", "1", "--minutes", "30",
             "--configs", *RETRIEVAL, *TOY, "--config.data.mqar_num_pairs=4"]
    retrieval.main(train)
    assert "6 of 6 runs finished" in capsys.readouterr().out
    retrieval.main(train)
    assert "$ " not in capsys.readouterr().out  # finished runs start no trainer

    evaluate = ["eval", "--out", str(out), "--examples", "2", "--batch-size", "2",
                "--depths", "0", "0.5", "1"]
    retrieval.main(evaluate)
    assert "every run is evaluated" in capsys.readouterr().out
    result = json.loads((out / "retrieval_4k_gates_half" / "seed1" / "retrieval.json").read_text())
    assert result["lengths"] == [128, 256, 512, 1024] and result["step"] == 4
    assert result["model"]["gate_bias_init"] == [0.0, 0.0, 0.0] and "selection" in result
    assert "selection" not in json.loads(
        (out / "retrieval_4k_full" / "seed0" / "retrieval.json").read_text())
    retrieval.main(evaluate)
    assert "wrote" not in capsys.readouterr().out  # nothing evaluated twice

    retrieval.main(["report", "--out", str(out)])
    text = (out / "report.md").read_text()
    for arm in ("retrieval_4k_nsa", "retrieval_4k_full", "retrieval_4k_gates_half"):
        assert f"| {arm} |" in text and f"`configs/{arm}.py` (seeds 0, 1)" in text
    assert "1024 (8x)" in text and "retrieval_4k_nsa: selection hit rate" in text
    assert "(cpu); jax " in text and "commit " in text
    assert "`python experiments/retrieval.py train --out" in text and "(2x)" in text
    assert (out / "retrieval.png").read_bytes()[:4] == b"\x89PNG"


def test_language_modelling_study(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # --gpus would otherwise ask for CUDA
    out = tmp_path / "lm"
    nsa_vs_full.main(["train", "--out", str(out), "--seeds", "0", "1", "--gpus", "2",
                      "--configs", *LM, *TOY])
    printed = capsys.readouterr().out
    assert "4 of 4 runs finished" in printed
    assert "[gpu 0] step" in printed and "[gpu 1] step" in printed  # side by side, one per GPU
    nsa_vs_full.main(["report", "--out", str(out)])
    text = (out / "report.md").read_text()
    for arm, attention in (("lm_8k_nsa", "nsa"), ("lm_8k_full", "full")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))
        assert f"| {attention} |" in row and "M | 0, 1 | 4, 4 |" in row
    assert " ± " in text and "| 4 |" in text  # the step-4 validation loss over both seeds
    assert "`configs/lm_8k_full.py` (seeds 0, 1)" in text
    assert (out / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
