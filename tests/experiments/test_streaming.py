"""experiments/streaming.py: a child's lines reach the parent's output and log while the child
still runs, a silent child gets heartbeat lines, and a child past its time limit is stopped."""
import sys
import threading
import time

import pytest

from experiments.streaming import Stages, run_streamed

PY = [sys.executable, "-c"]


def test_lines_arrive_while_the_child_still_runs(tmp_path, capsys):
    """The child prints, then waits for a file the test writes only after it saw that line in the
    log: output held until the child's exit would never let it finish (stopped at 60 s)."""
    go, log = tmp_path / "go", tmp_path / "child.log"
    child = ("import pathlib, sys, time\nprint('ready')\nprint('warn', file=sys.stderr)\n"
             f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\nprint('done')")
    result = {}
    worker = threading.Thread(target=lambda: result.update(done=run_streamed(
        [*PY, child], prefix="child| ", log_path=log, timeout_s=60)))
    worker.start()
    deadline = time.monotonic() + 50
    while not (log.exists() and "ready" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = log.exists() and "ready" in log.read_text()
    go.touch()
    worker.join()
    done = result["done"]
    assert seen and not done.timed_out and done.returncode == 0
    assert done.stdout == "ready\ndone\n" and done.stderr == "warn\n"
    out = capsys.readouterr().out
    assert "child| ready" in out and "child| warn" in out and "child| done" in out
    assert sorted(log.read_text().splitlines()) == ["done", "ready", "warn"]


def test_a_silent_child_gets_heartbeats(capsys):
    done = run_streamed([*PY, "import time; time.sleep(1.5)"], prefix="s| ", heartbeat_s=0.4)
    assert done.returncode == 0
    assert capsys.readouterr().out.count("s| ... still running") >= 2


def test_a_child_past_its_limit_is_stopped(capsys):
    started = time.monotonic()
    done = run_streamed([*PY, "import time; print('up', flush=True); time.sleep(60)"],
                        timeout_s=1.0)
    assert done.timed_out and done.returncode != 0 and done.stdout == "up\n"
    assert time.monotonic() - started < 30
    assert "stopping it (SIGTERM)" in capsys.readouterr().out


def test_bad_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        run_streamed([*PY, "pass"], timeout_s=0)


def test_stages_print_start_and_end_with_elapsed_seconds(capsys):
    stages = Stages("demo")
    with stages.stage("work", estimate_s=5):
        pass
    with pytest.raises(RuntimeError), stages.stage("broken"):
        raise RuntimeError("x")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[demo ") and out[0].endswith("start work (estimate ~5 s)")
    assert "end work in" in out[1] and "FAILED broken after" in out[3]
    assert stages.left(1e6) > 0 and stages.left(0) == 0
