"""`carsync ui` serves the Dagster UI on the carsync instance, with the asset lineage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LINEAGE_QUERY = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ui_serves_the_asset_lineage(database_url: str, tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARSYNC_", "API_"))}
    env.update(
        DATABASE_URL=database_url,
        API_BASE_URL="http://127.0.0.1:9",
        API_KEY="ui-test-key",
        DAGSTER_HOME=str(tmp_path / "dagster"),
        CARSYNC_DATA_DIR=str(tmp_path / "data"),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "carsync_dagster", "ui", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, "carsync ui exited"
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/graphql", json={"query": LINEAGE_QUERY}, timeout=5
                )
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the UI did not come up"
            time.sleep(0.5)
        nodes = response.json()["data"]["assetNodes"]
        upstream = {
            node["assetKey"]["path"][0]: [key["path"][0] for key in node["dependencyKeys"]]
            for node in nodes
        }
        assert upstream == {
            "pages": [],
            "normalised": ["pages"],
            "cars": ["normalised"],
            "recent_changes": ["cars"],
            "vanished_listings": ["recent_changes"],
        }
    finally:
        process.terminate()  # SIGTERM to `carsync ui` alone: it must stop what it started
        process.wait(timeout=60)
        leftovers = subprocess.run(
            ["pgrep", "-f", f"(-p|--port) {port}"], capture_output=True, text=True, check=False
        ).stdout.split()
        if leftovers:
            os.killpg(process.pid, signal.SIGKILL)
        assert leftovers == [], "dagster dev, webserver or daemon left running"
