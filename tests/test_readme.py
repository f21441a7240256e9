"""The README's set-up commands and CI agree: CI runs the README's test command verbatim."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands():
    readme = (ROOT / "README.md").read_text()
    return [c.strip() for c in re.findall(r"```bash\n(python3\.12 -m venv .*?)\n```", readme, re.S)]


def test_readme_has_the_two_setup_commands():
    main_job, tests = _commands()
    assert main_job.endswith("nsa-train --config configs/tiny.py")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().split("verbatim below ---\n", 1)[1]
    _, tests = _commands()
    assert " && ".join(ci.strip().splitlines()) == tests
