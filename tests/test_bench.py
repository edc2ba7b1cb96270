"""Every benchmark still runs (in its --quick mode) and prints its ratios against an in-process baseline.

The figures themselves are measured by running the benchmarks in full (README table); tests never time.
"""
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT, worker_env

BENCHES = {
    "bench/align.py": ["--quick"],
    "bench/flops.py": [],
    "bench/packing.py": ["--quick"],
    "bench/preprocess.py": ["--quick"],
    "bench/convert.py": ["--quick", "--repeats", "1", "--cache", "warm", "--settle", "0"],  # the smoke, not the figure
    "bench/decode.py": ["--quick"],
    "bench/tokenize_speech.py": ["--quick"],
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", sorted(BENCHES))
def test_benchmark_runs(script):
    p = subprocess.run([sys.executable, script, *BENCHES[script]], cwd=ROOT, env=worker_env(), capture_output=True,
                       text=True, timeout=550)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x" in p.stdout and any(ch.isdigit() for ch in p.stdout)
