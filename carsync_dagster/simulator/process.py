"""Start the simulator as a child process and drive its control endpoints."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import IO, Any

import httpx
import orjson

from .server import KEY_ENV

LISTENING = "carsync simulator listening on "
# 20 digits or more: an integer that may be past 64 bits, which orjson reads as a float.
_BIG_INTEGER = re.compile(rb"[0-9]{20}")
START_TIMEOUT = 20.0


class SimulatorControl:
    """Sync client of the /_sim/ endpoints (same key as the API)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        # The truth of 200,000 listings is about 100 MB of JSON: allow it time.
        self._client = httpx.Client(
            base_url=base_url, headers={"X-API-Key": api_key}, timeout=120.0
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._client.request(method, path, json=body)
        response.raise_for_status()
        return orjson.loads(response.content)

    def truth(self) -> dict[str, list[Any]]:
        """{"cars": expected rows, "rejected": expected rejections, "deleted": gone ids}."""
        response = self._client.get("/_sim/truth")
        response.raise_for_status()
        body = response.content
        result: dict[str, list[Any]] = (
            json.loads(body) if _BIG_INTEGER.search(body) else orjson.loads(body)
        )
        return result

    def mutate(
        self, update: int = 0, insert: int = 0, delete: int = 0, seed: int | None = None
    ) -> dict[str, list[str]]:
        body: dict[str, Any] = {"update": update, "insert": insert, "delete": delete}
        if seed is not None:
            body["seed"] = seed
        result: dict[str, list[str]] = self._call("POST", "/_sim/mutate", body)
        return result

    def undelete(self, ids: Sequence[str]) -> list[str]:
        result: list[str] = self._call("POST", "/_sim/undelete", {"ids": list(ids)})["undeleted"]
        return result

    def fix(
        self, count: int = 0, ids: Sequence[str] | None = None, seed: int | None = None
    ) -> list[str]:
        """Fix broken listings with a usable id at the source: `ids`, then `count` random ones.

        They are served valid from then on, with a fresh updated_at. Returns the fixed ids.
        """
        body: dict[str, Any] = {"count": count, "ids": list(ids or ())}
        if seed is not None:
            body["seed"] = seed
        result: list[str] = self._call("POST", "/_sim/fix", body)["fixed"]
        return result

    def break_pages(self, pages: Mapping[int, str]) -> dict[str, str]:
        """Serve list pages broken (server.BREAKAGES) until mended (`"mend"`); returns all."""
        body = {"pages": {str(page): how for page, how in pages.items()}}
        result: dict[str, str] = self._call("POST", "/_sim/break", body)["broken_pages"]
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_sim/stats")
        return result

    def reset_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/_sim/stats/reset")
        return result

    def configure(self, **faults: float) -> dict[str, Any]:
        """Change fault settings by flag name with underscores; returns all settings."""
        result: dict[str, Any] = self._call("POST", "/_sim/config", dict(faults))
        return result

    def close(self) -> None:
        self._client.close()


class RunningSimulator:
    """A started simulator; stop() it, or use it as a context manager."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        base_url: str,
        api_key: str,
        reader: threading.Thread,
    ) -> None:
        self.process = process
        self._reader = reader
        self.base_url = base_url
        self.api_key = api_key
        self.control = SimulatorControl(base_url, api_key)

    def stop(self, timeout: float = 5.0) -> None:
        self.control.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()
        self._reader.join(timeout)  # it closes stdout once the child has gone

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_stdout(stdout: IO[bytes], lines: queue.Queue[str]) -> None:
    """Hand over the first line, then keep draining so the child never blocks on a full pipe."""
    first = True
    with stdout:
        for raw in stdout:
            if first:
                lines.put(raw.decode(errors="replace").strip())
                first = False
    if first:
        lines.put("")  # the child closed stdout (it died) before saying anything


def _tail(stderr: IO[bytes], limit: int = 4000) -> str:
    stderr.seek(0, os.SEEK_END)
    size = stderr.tell()
    stderr.seek(max(0, size - limit))
    return stderr.read().decode(errors="replace").strip()


def start_simulator(
    cars: int = 200_000,
    seed: int = 1,
    args: Sequence[str] = (),
    api_key: str | None = None,
    env: Mapping[str, str] | None = None,
) -> RunningSimulator:
    """Start `python -m carsync_dagster.simulator` on a free loopback port and wait for it.

    `env` adds to (or overrides) this process's environment. The key only travels in the
    child's environment. The child exits when this process dies, as its stdin pipe closes. It
    runs in a session of its own: a terminal's Ctrl+C goes to its whole foreground process group,
    and the simulator must outlive it until this process, still using it, stops it.
    """
    key = api_key if api_key is not None else secrets.token_urlsafe(24)
    child_env = {**os.environ, **(env or {}), KEY_ENV: key}
    command = [
        sys.executable,
        "-m",
        "carsync_dagster.simulator",
        "--port",
        "0",
        "--cars",
        str(cars),
        "--seed",
        str(seed),
        "--exit-with-stdin",
        *args,
    ]
    with tempfile.TemporaryFile() as stderr:  # the child keeps its own handle after start
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_env,
            start_new_session=True,
        )
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=_read_stdout, args=(process.stdout, lines), name="simulator-stdout", daemon=True
        )
        reader.start()
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            line = ""
        if not line.startswith(LISTENING):
            alive = process.poll() is None
            if alive:
                process.kill()
            process.wait()
            if process.stdin is not None:
                process.stdin.close()
            reader.join(5)
            why = "did not start within 20 s" if alive else f"exited with code {process.returncode}"
            said = _tail(stderr) or line
            raise RuntimeError(f"the simulator {why}" + (f"; it said:\n{said}" if said else ""))
    return RunningSimulator(process, line.removeprefix(LISTENING), key, reader)
