"""experiments/bench_model.py and step_profile.py: the categorisation rules, fusions named by
what they fuse, the ratio verdicts, and the whole --smoke run (every model through the trainer,
then the profile parser on a real CPU trace: the categories add up to every kernel of the step)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench_model import ARMS, DEFAULT_ARMS, TARGETS, ratios
from experiments.step_profile import CATEGORIES, OTHER, categorize, instruction_sources

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_categorize_prefers_the_specific_names():
    assert categorize("nsa_selected_fwd custom-call.3") == "selected branch"
    assert categorize("fusion.1 /x/nsa_jax/ops/compression.py:compressed_attention_xla") == (
        "compressed branch")
    assert categorize("fusion.2 /x/nsa_jax/layers/compressor.py:__call__") == "compressor"
    assert categorize("custom-call.9 /x/nsa_jax/ops/window.py:window_attention_cudnn") == (
        "window branch")
    assert categorize("fusion.4 /x/nsa_jax/ops/selection.py:select_xla") == "selection/scoring"
    assert categorize("fusion.5 /x/site-packages/optax/_src/transform.py:update_moment") == (
        "optimizer")
    # XLA's select op names many fusions; it alone says nothing about NSA's selection
    assert categorize("broadcast_select_fusion.1 broadcast_select_fusion.1") == OTHER


def test_a_fusion_is_named_by_the_ops_it_fuses():
    def inner(x):
        return jnp.sin(x) * 2

    def outer(x):
        return inner(x) + 1

    text = jax.jit(outer).lower(jnp.ones(3)).compile().as_text()
    sources = instruction_sources(text)
    fusions = [name for name in sources if "fusion" in name and "computation" not in name]
    assert fusions and all(".inner" in sources[name] and ".outer" in sources[name]
                           for name in fusions)


def test_ratios_and_verdicts():
    rng = np.random.default_rng()
    results = {name: {"tokens_per_s": float(rng.uniform(1e4, 1e6))} for name in ARMS}
    rows = ratios(results)
    assert len(rows) == 4
    for row in rows:
        layout = "packed" if "unpacked" not in row["baseline"] else "unpacked"
        expected = (results[f"nsa_{row['context']}"]["tokens_per_s"]
                    / results[f"full_{row['context']}_{layout}"]["tokens_per_s"])
        assert row["ratio"] == pytest.approx(expected)
        assert row["verdict"] == ("PASS" if expected >= TARGETS[row["context"]] else "MISS")
    del results["full_8k_unpacked"]
    assert [r["baseline"] for r in ratios(results) if r["context"] == "8k"] == ["full, packed rows"]


def test_smoke_runs_every_model_and_the_profile(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "experiments/bench_model.py", "--smoke"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "bench_model.json").read_text())
    assert list(report["throughput"]) == list(DEFAULT_ARMS) and not report["skipped"]
    assert all(r["tokens_per_s"] > 0 for r in report["throughput"].values())
    assert "--config.data.packed=false" in report["throughput"]["full_8k_unpacked"]["overrides"]
    assert len(report["ratios"]) == 3 and {r["verdict"] for r in report["ratios"]} <= {"PASS",
                                                                                        "MISS"}
    # the profile of the CPU trace: every kernel in exactly one category
    profile = report["profile"]
    per_category = profile["ms_per_step"]
    assert set(per_category) == {name for name, _ in CATEGORIES} | {OTHER}
    assert profile["kernels"] > 0 and profile["kernel_ms_per_step"] > 0
    assert sum(per_category.values()) == pytest.approx(profile["kernel_ms_per_step"])
    assert all(ms >= 0 for ms in per_category.values())
    # every step runs the optimizer update and the dense layers, so both must be found
    assert per_category["optimizer"] > 0 and per_category["MLP/matmuls"] > 0
    assert (tmp_path / "step_trace.json.gz").stat().st_size > 0
    markdown = (tmp_path / "bench_model.md").read_text()
    assert "Training throughput" in markdown and "device time goes" in markdown


def test_the_budget_covers_the_first_run_and_its_output_is_streamed(tmp_path):
    """--budget-s 5 cannot hold even a toy trainer's start-up: the first run is stopped at the
    budget's end and reported as cut, the next one not started, and what the trainer printed
    before the stop is in the parent's output and its log under $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "experiments/bench_model.py", "--smoke", "--models",
                           "nsa_8k,full_8k_packed", "--profile-model", "", "--budget-s", "5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "bench_model.json").read_text())
    assert report["throughput"] == {} and report["plan"].startswith("plan: 2 trainer run(s)")
    assert len(report["skipped"]) == 1 and report["skipped"][0].startswith("cut nsa_8k")
    assert "start run nsa_8k" in done.stdout and "stopping it (SIGTERM)" in done.stdout
    assert "nsa_8k| $ " in done.stdout and "full_8k_packed|" not in done.stdout
    assert (tmp_path / "bench_model_nsa_8k.log").exists()
