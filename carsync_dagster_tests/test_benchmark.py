"""The benchmark command runs at a tiny size, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_benchmark_prints_figures(database_url: str, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--cars", "3000", "--limit-seconds", "2",
         "--database-url", database_url, "--output", str(output)],
        capture_output=True, text=True, timeout=300, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "full_sync" in result.stdout and "unchanged_resync" in result.stdout
    figures = json.loads(output.read_text())
    assert figures["full_sync"]["inserted"] > 2900
    assert figures["unchanged_resync"]["inserted"] == 0
    assert figures["unchanged_resync"]["updated"] == 0
    assert figures["full_sync"]["peak_pss_mb"] > 0
    assert figures["hostile_sync"]["inserted"] == figures["full_sync"]["inserted"]
    assert 0 < figures["server_limited"]["achieved_rps"] <= 40
    assert "hostile / clean full sync" in result.stdout
    assert figures["unchanged_resync"]["cars_rows_written"] == 0
    assert figures["incremental_1pct"]["updated"] == 30
    assert figures["full_sync"]["reader_queries"] > 0
