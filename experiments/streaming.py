"""Progress that a GPU script's log shows while it runs, not only when it ends.

    stages = Stages("bench_model")                  # "[bench_model  12.3 s] ..." lines, flushed
    with stages.stage("run nsa_8k", estimate_s=120):
        done = run_streamed(command, prefix="  nsa_8k| ", log_path=out / "nsa_8k.log",
                            timeout_s=stages.left(budget_s))
    done.returncode, done.stdout, done.stderr, done.timed_out, done.wall_s

Why: subprocess.run(capture_output=True) holds a child's whole output until the child exits, so
a script stopped by `timeout` while a child still runs leaves an empty log and no clue whether
the child was compiling, training on the CPU or hung (the H200 runs of bench_model.py and
long_context_check.py on 2026-11-30). Here every child line is printed (and appended to its log
file) as it arrives, a child silent for `heartbeat_s` gets a "still running" line, and a child
past `timeout_s` gets SIGTERM (the trainer saves a checkpoint and exits on it), then SIGKILL.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import subprocess
import threading
import time

HEARTBEAT_S = 30.0  # a silent child gets a "still running" line this often
KILL_AFTER_S = 30.0  # SIGTERM -> SIGKILL grace (a trainer's checkpoint on SIGTERM takes seconds)


class Stages:
    """Start and end lines of a script's stages, each stamped with seconds since the script
    started and flushed at once (a log redirected to a file shows them even if killed)."""

    def __init__(self, name: str):
        self.name, self.started = name, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self, budget_s: float) -> float:
        """Seconds of an overall budget (counted from the script's start) still left, >= 0."""
        return max(budget_s - self.elapsed(), 0.0)

    def say(self, text: str) -> None:
        print(f"[{self.name} {self.elapsed():6.1f} s] {text}", flush=True)

    @contextlib.contextmanager
    def stage(self, what: str, estimate_s: float | None = None):
        """Prints 'start <what>' (with its estimate) and 'end <what> in N s' (or 'FAILED')."""
        estimate = "" if estimate_s is None else f" (estimate ~{estimate_s:.0f} s)"
        self.say(f"start {what}{estimate}")
        start = time.perf_counter()
        try:
            yield
        except BaseException as error:
            self.say(f"FAILED {what} after {time.perf_counter() - start:.1f} s: "
                     f"{type(error).__name__}")
            raise
        self.say(f"end {what} in {time.perf_counter() - start:.1f} s")


@dataclasses.dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool  # stopped at timeout_s
    wall_s: float


def run_streamed(command: list[str], *, cwd=None, env: dict | None = None, prefix: str = "",
                 log_path: pathlib.Path | None = None, timeout_s: float | None = None,
                 heartbeat_s: float = HEARTBEAT_S) -> Finished:
    """Runs `command`, printing each stdout and stderr line (after `prefix`) as it arrives and
    appending it to `log_path`; stops it after `timeout_s` seconds (None: no limit). -> its exit
    code and whole output. The child runs with PYTHONUNBUFFERED=1 so a Python child's lines are
    not held in its own buffers either."""
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    deadline = math.inf if timeout_s is None else started + timeout_s
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, errors="replace")
    lines = {"stdout": [], "stderr": []}
    lock, last_output = threading.Lock(), [started]
    log = open(log_path, "w") if log_path is not None else contextlib.nullcontext()

    def pump(stream, name):
        for line in stream:
            with lock:
                lines[name].append(line)
                last_output[0] = time.monotonic()
                print(prefix + line.rstrip("\n"), flush=True)
                if log_path is not None:
                    log.write(line)
                    log.flush()

    pumps = [threading.Thread(target=pump, args=(s, n), daemon=True)
             for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
    with log:
        for thread in pumps:
            thread.start()
        timed_out = False
        try:
            timed_out = _wait(proc, deadline, started, last_output, lock, prefix, heartbeat_s)
        finally:
            if proc.poll() is None:  # this process was interrupted: leave no orphan on the GPU
                proc.kill()
                proc.wait()
            for thread in pumps:
                thread.join(timeout=10)
    return Finished(proc.returncode, "".join(lines["stdout"]), "".join(lines["stderr"]),
                    timed_out, time.monotonic() - started)


def _wait(proc, deadline, started, last_output, lock, prefix, heartbeat_s) -> bool:
    """Waits for `proc`, printing a line when it has been silent for heartbeat_s and stopping it
    at `deadline`; -> whether it was stopped."""
    last_beat, stopped_at = started, None
    while proc.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        with lock:
            silent = now - last_output[0]
        if silent >= heartbeat_s and now - last_beat >= heartbeat_s:
            print(f"{prefix}... still running: {now - started:.0f} s since start, no output for "
                  f"{silent:.0f} s", flush=True)
            last_beat = now
        if stopped_at is None and now >= deadline:
            print(f"{prefix}... time limit: stopping it (SIGTERM) after {now - started:.0f} s",
                  flush=True)
            proc.terminate()
            stopped_at = now
        elif stopped_at is not None and now - stopped_at >= KILL_AFTER_S:
            print(f"{prefix}... still alive {KILL_AFTER_S:.0f} s after SIGTERM: SIGKILL",
                  flush=True)
            proc.kill()
            stopped_at = math.inf
    return stopped_at is not None
