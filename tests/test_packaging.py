"""setup.py is the thin setuptools shim over pyproject.toml: tooling that calls it sees the same metadata."""
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_reports_the_pyproject_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-1] == version
