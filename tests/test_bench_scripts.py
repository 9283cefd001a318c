"""Every benchmark script starts: its imports resolve and it prints its usage.

The benchmarks run by hand on a quiet machine, so nothing else would notice a script
broken by a change elsewhere (a helper moved between bench modules, a renamed API)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def test_the_benchmarks_are_found():
    assert {"bench_single.py", "bench_versions.py", "bench_defaults.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_benchmark_prints_its_usage(script):
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=BENCH,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
