"""The benchmark's smoke run: N=2 and a few clears, only to prove the code works."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.processes, pytest.mark.bench]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(400)  # the smoke run's own timeout (300 s), and the report's checks
def test_benchmark_smoke_run_writes_a_report(tmp_path: Path):
    output = tmp_path / "benchmarks.md"
    result = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--output", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    text = output.read_text()
    assert "# Benchmarks" in text and "| 2 |" in text
    assert "overhead ratio" in text
    if shutil.which("redis-server"):
        assert "not measured" not in text, "the Redis peer should have run"
    if shutil.which("wrk"):
        assert "cachebus, warm credential" in text
    assert "## Scale of fan-out" in text and "## Scale through relays" in text and "## Burst" in text
    assert "## A flood of wrong credentials" in text and "| cold |" in text and "| warm |" in text
    assert (tmp_path / "benchmarks-latency.png").stat().st_size > 0
