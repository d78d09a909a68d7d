"""`carsync ui` as a test fixture: started on a free loopback port, driven over GraphQL, and
stopped (with everything it started) afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def graphql(base: str, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    body = {"query": query, "variables": dict(variables or {})}
    response = httpx.post(f"{base}/graphql", json=body, timeout=10)
    response.raise_for_status()
    data: dict[str, Any] = response.json()["data"]
    return data


def wait_for(what: str, seconds: float, check: Callable[[], T]) -> T:
    """The first truthy value of `check()`, polled every half second."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def leftovers(port: int) -> list[str]:
    """Pids of processes still serving `port` (dagster dev, webserver, daemon)."""
    found = subprocess.run(
        ["pgrep", "-f", f"(-p|--port) {port}"], capture_output=True, text=True, check=False
    )
    return found.stdout.split()


@contextmanager
def carsync_ui(env: Mapping[str, str], cwd: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`carsync ui` running; yields its base URL once the webserver answers, and its process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "carsync_dagster", "ui", "--port", str(port)],
        env=dict(env), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert process.poll() is None, "carsync ui exited"
            return httpx.get(f"{base}/server_info").is_success

        wait_for("the UI", 90, up)
        yield base, process
    finally:
        process.terminate()  # SIGTERM to `carsync ui` alone: it must stop what it started
        try:
            process.wait(timeout=60)
        finally:
            if leftovers(port):
                os.killpg(process.pid, signal.SIGKILL)
