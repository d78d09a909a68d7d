"""The benchmark command runs at a tiny size, peers included, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest


def test_benchmark_prints_figures(database_url: str, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    # The first run on a machine also builds benchmarks/.peers-venv (dlt, matplotlib): ~20 s.
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
    assert figures["full_sync"]["rows_written"] == figures["full_sync"]["inserted"]
    assert figures["unchanged_resync"]["rows_written"] == 0
    assert figures["incremental_1pct"]["updated"] == 30
    assert figures["incremental_1pct"]["rows_written"] == 30
    readers = figures["full_sync_with_readers"]
    assert readers["reader_queries"] > 0 and readers["inserted"] == figures["full_sync"]["inserted"]
    # CPU is counted for the tool (its own processes), the simulator and PostgreSQL when it runs
    # on this machine (the embedded one does).
    local = urlsplit(database_url).hostname in (None, "", "localhost", "127.0.0.1")
    for run in (figures["full_sync"], figures["unchanged_resync"]):
        used = run["cpu_seconds"]
        assert used["tool"] > 0.3 and used["simulator"] > 0
        if local:
            assert used["postgres"] > 0
            assert used["total"] == pytest.approx(
                sum(used[k] for k in ("tool", "simulator", "postgres"))
            )
        else:
            assert used["postgres"] is None and used["total"] is None
    # The peers' processes are theirs alone: dlt's pipeline costs more CPU than the seed script.
    peer_cpu = {
        tool: figures["peers"][tool]["full_sync"]["cpu_seconds"] for tool in ("seed", "dlt")
    }
    assert peer_cpu["dlt"]["tool"] > peer_cpu["seed"]["tool"] > 0
    # The floor read the same 30 pages, about 60 KB each, and wrote nothing.
    assert figures["bare_fetch"]["pages"] >= 30
    assert figures["bare_fetch"]["bytes"] > 30 * 30_000
    assert "floor: a bare httpx client" in result.stdout
    assert figures["new_instance_seconds"] > 0

    # The peers of issue 7 load the same 3000 cars, each into its own schema.
    seed, dlt = figures["peers"]["seed"], figures["peers"]["dlt"]
    for tool in (seed, dlt):
        assert tool["full_sync"]["rows_written"] >= 2900
        assert tool["full_sync"]["peak_pss_mb"] > 0
    # Without a hash guard every row is written again although nothing changed.
    assert seed["unchanged_resync"]["rows_written"] == seed["full_sync"]["rows_written"]
    # The API's requests per second were caught for every run: 30 pages of 100 at least.
    for run in (figures["full_sync"], seed["full_sync"], dlt["full_sync"]):
        assert sum(run["pages_per_second"]) >= 30
    table = result.stdout.splitlines()
    assert [line.split()[:2] for line in table if line.startswith(("seed ", "dlt "))] == [
        ["seed", "full_sync"], ["seed", "unchanged_resync"],
        ["dlt", "full_sync"], ["dlt", "unchanged_resync"],
    ]  # fmt: skip
    for name in ("time", "memory", "throughput"):
        plot = tmp_path / f"bench-{name}.png"
        assert plot.read_bytes().startswith(b"\x89PNG"), plot
