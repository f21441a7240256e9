"""The import contracts of setup.cfg ([importlinter] sections) hold: layers, no Flax in the ops
and kernels, trained runs only through nsa_jax.train's public loader, no cycles."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lint_imports_keeps_every_contract():
    # lint-imports comes with the `test` extra, next to this interpreter (or on the PATH).
    beside = pathlib.Path(sys.executable).parent / "lint-imports"
    command = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert command, "lint-imports not found: install the test extra (pip install -e '.[test]')"
    # This checkout's packages first, whatever an installed copy elsewhere says.
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([command], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
