"""The README's set-up commands and CI agree: CI runs the README's test command verbatim; their
Python 3.12 finder (.ci/python3.12) takes a pyenv 3.12 that is not selected, and says what to
install when there is none."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands():
    readme = (ROOT / "README.md").read_text()
    pattern = r"```bash\n(sh \.ci/python3\.12 -m venv .*?)\n```"
    return [c.strip() for c in re.findall(pattern, readme, re.S)]


def test_readme_has_the_two_setup_commands():
    main_job, tests = _commands()
    assert main_job.endswith("nsa-train --config configs/tiny.py")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_then_the_slow_cases():
    ci = (ROOT / ".ci" / "run").read_text().split("verbatim below ---\n", 1)[1]
    ci = ci.split("# --- end of the README's command", 1)[0]
    _, tests = _commands()
    assert " && ".join(ci.strip().splitlines()) == tests
    assert '-m "not slow"' in tests
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("pytest -n 2 -q -m slow")


def _executable(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


def _finder(path_dir: pathlib.Path) -> subprocess.CompletedProcess:
    for tool in ("grep", "tail"):
        (path_dir / tool).symlink_to(shutil.which(tool))
    return subprocess.run(["/bin/sh", str(ROOT / ".ci" / "python3.12"), "-c", "x"],
                          env={"PATH": str(path_dir)}, capture_output=True, text=True)


def test_finder_takes_a_pyenv_312_that_is_not_the_global(tmp_path):
    """pyenv's python3.12 shim fails (another global version), but pyenv has 3.12.1."""
    bin_dir, root = tmp_path / "bin", tmp_path / "pyenv"
    _executable(bin_dir / "python3.12", "echo 'python3.12: command not found' >&2; exit 127\n")
    _executable(bin_dir / "pyenv",
                f'[ "$1" = root ] && echo {root} || printf "3.11.4\\n3.12.1\\n"\n')
    _executable(root / "versions" / "3.12.1" / "bin" / "python3.12", 'echo "3.12.1 ran: $*"\n')
    done = _finder(bin_dir)
    assert (done.returncode, done.stdout) == (0, "3.12.1 ran: -c x\n")


def test_finder_says_what_to_install_when_there_is_no_312(tmp_path):
    (tmp_path / "bin").mkdir()
    done = _finder(tmp_path / "bin")
    assert done.returncode == 127
    assert "needs Python 3.12" in done.stderr and "pyenv install 3.12" in done.stderr
