"""A run killed with SIGKILL mid-training and restarted with the same command ends with the same
per-step losses as an uninterrupted run, bit for bit (CPU)."""
import os
import signal
import subprocess
import sys
import time

from tests.helpers.runs import REPO, TINY, losses, overrides, share_compilations

STEPS = 40


def command(workdir):
    return [sys.executable, "-m", "nsa_jax.train", "--config", str(TINY), "--workdir",
            str(workdir), *overrides(steps=STEPS, eval_every=20)]


def test_sigkill_then_rerun_gives_identical_losses(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO),
           **share_compilations(tmp_path / "jax_cache")}
    run = lambda workdir: subprocess.run(command(workdir), env=env, cwd=tmp_path,
                                         capture_output=True, text=True, timeout=300)
    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (killed / "metrics.jsonl").exists() or max(losses(killed), default=0) < 10:
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert max(losses(killed)) < STEPS

    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    assert losses(killed) == losses(tmp_path / "whole")
    assert sorted(losses(killed)) == list(range(1, STEPS + 1))
