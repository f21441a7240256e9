"""SIGTERM / SIGINT become a flag the train loop polls between steps, so it can save a checkpoint
and stop cleanly instead of dying mid-step."""
from __future__ import annotations

import contextlib
import signal


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; exit_code follows the shell's
    128 + signal number convention."""

    def __init__(self, signum: int, step: int):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; a checkpoint "
                         "was saved: run the same command again to resume")


@contextlib.contextmanager
def catch_stop_signals():
    """Yields a list that receives the number of each SIGTERM / SIGINT delivered inside."""
    received = []
    handler = lambda signum, frame: received.append(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
