"""A PostgreSQL cluster of one's own, to restart at will (never the shared server on :5432).

Debian's PostgreSQL 15 binaries, a fresh data folder, trust authentication, listening on
127.0.0.1 on a free port and on no unix socket. initdb and postgres refuse to run as root, so as
root the server runs as the `postgres` user (runuser) in a folder that user owns.

    with PrivatePostgres() as pg:
        ...pg.url...
        pg.restart("immediate")
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

BIN = Path("/usr/lib/postgresql/15/bin")
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "''",  # none: TCP only
    "fsync": "off",  # a crash of the server, not of the machine: the OS keeps what it wrote
    "max_connections": "100",
}


def available() -> str | None:
    """Why a private cluster cannot start here, or None when it can."""
    missing = [name for name in ("initdb", "pg_ctl", "postgres") if not (BIN / name).exists()]
    if missing:
        return f"{', '.join(missing)} not found in {BIN} (apt-get install postgresql-15)"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser to become the postgres user"
    return None


class PrivatePostgres:
    """Start on entering (or with start()); stop() and start() again; removed on exit."""

    def __init__(self) -> None:
        why = available()
        if why is not None:
            raise RuntimeError(f"no private PostgreSQL: {why}")
        self.folder = Path(tempfile.mkdtemp(prefix="carsync-private-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run(BIN / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip

    def _run(self, *command: object) -> None:
        done = subprocess.run(
            [*self._as_user, *map(str, command)], capture_output=True, text=True, check=False,
            timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{Path(str(command[0])).name} failed: {done.stderr.strip()}")

    def start(self) -> None:
        options = " ".join(f"-c {name}={value}" for name, value in SETTINGS.items())
        self._run(BIN / "pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l", self.log,
                  "-o", f"-p {self.port} {options}")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends the sessions and shuts down cleanly; `immediate` is a crash (recovery
        at the next start, unlogged tables emptied)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"no such shutdown mode: {mode}")
        self._run(BIN / "pg_ctl", "stop", "-w", "-t", "60", "-D", self.data, "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def cleanup(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
