"""Is the warehouse's PostgreSQL up, and did it restart? `pg_postmaster_start_time()` changes
with every restart, so a sync can tell a server that went away and came back from a failure
of its own."""

from __future__ import annotations

import time
from datetime import datetime

import psycopg

_CONNECT_TIMEOUT = 3  # seconds, per attempt


def server_started(database_url: str) -> datetime | None:
    """When the server last started, or None when it cannot be reached now."""
    try:
        with psycopg.connect(database_url, connect_timeout=_CONNECT_TIMEOUT) as conn:
            row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    except psycopg.OperationalError:
        return None
    return row[0] if row else None


def wait_for_server(database_url: str, timeout: float, every: float = 0.5) -> datetime | None:
    """The server's start time once it answers, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        started = server_started(database_url)
        if started is not None or time.monotonic() >= deadline:
            return started
        time.sleep(every)
