"""The processes carsync starts end when carsync is done with them, and not before: the embedded
PostgreSQL stops with its last live user even after users died by kill -9, and `carsync ui` stops
everything it started on the first Ctrl+C (or SIGTERM), while a terminal's Ctrl+C reaches no child
of it directly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
import pytest

from carsync_dagster.warehouse.embedded import HANDLES, STARTS, is_user
from carsync_dagster_tests.conftest import run_carsync
from carsync_dagster_tests.ui_process import free_port, wait_for

# A carsync process using the embedded server, until it is killed.
USER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from carsync_dagster.warehouse.embedded import start_embedded_postgres

    start_embedded_postgres(Path(sys.argv[1]))
    print("joined", flush=True)
    time.sleep(600)
    """
)


def _embedded_env(data_dir: Path) -> dict[str, str]:
    """This environment without carsync's settings: the embedded server under `data_dir`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CARSYNC_", "API_", "DATABASE_URL", "DAGSTER_HOME"))
    }
    env["CARSYNC_DATA_DIR"] = str(data_dir)
    return env


def _postmaster(data_dir: Path) -> psutil.Process | None:
    """The embedded server's postmaster, if it runs."""
    pid_file = data_dir / "pg" / "postmaster.pid"
    if not pid_file.exists():
        return None
    with suppress(psutil.NoSuchProcess, ValueError, IndexError):  # gone, or being written
        return psutil.Process(int(pid_file.read_text().split()[0]))
    return None


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _until_zombie(pid: int) -> None:
    """Wait for `pid`, a child not waited for, to have died."""
    wait_for("a zombie", 10, lambda: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)


def _stopped(data_dir: Path, postmaster: psutil.Process) -> bool:
    return not (data_dir / "pg" / "postmaster.pid").exists() and not _running(postmaster)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data folder whose embedded server is stopped afterwards, whatever the test left."""
    folder = tmp_path / "data"
    yield folder
    postmaster = _postmaster(folder)
    if postmaster is not None:
        with suppress(psutil.NoSuchProcess):
            postmaster.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            postmaster.wait(30)


def _user(data_dir: Path) -> subprocess.Popen[str]:
    """A process that joined the embedded server and sleeps."""
    user = subprocess.Popen(
        [sys.executable, "-c", USER, str(data_dir)], stdout=subprocess.PIPE, text=True
    )
    assert user.stdout is not None
    assert user.stdout.readline().strip() == "joined"
    user.stdout.close()
    return user


def test_users_killed_by_sigkill_do_not_keep_the_embedded_server_running(
    data_dir: Path, tmp_path: Path
) -> None:
    reaped, zombie = _user(data_dir), _user(data_dir)
    assert json.loads((data_dir / "pg" / HANDLES).read_text()) == [reaped.pid, zombie.pid]
    reaped.kill()
    reaped.wait()
    zombie.kill()  # dead, but its parent (this test) does not wait for it yet
    postmaster = _postmaster(data_dir)
    assert postmaster is not None and postmaster.is_running()
    _until_zombie(zombie.pid)

    status = run_carsync(["status", "--json"], _embedded_env(data_dir), tmp_path, timeout=120)
    zombie.wait()

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["syncs"] == []
    # The last live user stopped the server on its way out.
    assert _stopped(data_dir, postmaster)
    assert json.loads((data_dir / "pg" / HANDLES).read_text()) == []


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-start", "listed-before"])
def test_a_listed_pid_now_another_process_is_not_a_user(
    data_dir: Path, tmp_path: Path, recorded: bool
) -> None:
    """A dead user's pid given to another process: told apart by the start carsync recorded,
    or (a list written by a process that recorded none) by starting after the list was written."""
    user = _user(data_dir)
    user.kill()
    user.wait()
    postmaster = _postmaster(data_dir)
    assert postmaster is not None
    other = subprocess.Popen(["sleep", "600"])
    try:
        started = psutil.Process(other.pid).create_time()
        pgdata = data_dir / "pg"
        (pgdata / HANDLES).write_text(json.dumps([other.pid]))
        if recorded:  # it was a carsync process that started an hour earlier
            (pgdata / STARTS).write_text(json.dumps({str(other.pid): started - 3600}))
        else:  # the list was last written a minute before that process started
            (pgdata / STARTS).unlink()
            os.utime(pgdata / HANDLES, (started - 60, started - 60))

        status = run_carsync(["status"], _embedded_env(data_dir), tmp_path, timeout=120)

        assert status.returncode == 0, status.stderr
        assert _stopped(data_dir, postmaster)
        assert other.poll() is None  # left alone
    finally:
        other.kill()
        other.wait()


def test_a_user_is_a_running_process_started_when_recorded() -> None:
    me = psutil.Process()
    assert is_user(me.pid, me.create_time(), listed_at=0.0)
    assert not is_user(me.pid, me.create_time() - 3600, listed_at=time.time())
    assert is_user(me.pid, None, listed_at=me.create_time() + 10)
    assert not is_user(me.pid, None, listed_at=me.create_time() - 3600)
    child = subprocess.Popen(["true"])
    _until_zombie(child.pid)
    assert not is_user(child.pid, None, listed_at=time.time())  # a zombie
    child.wait()
    assert not is_user(child.pid, None, listed_at=time.time())  # gone


@pytest.mark.parametrize(
    ("how", "code"),
    [("ctrl-c", 130), ("sigterm", 143)],
    ids=["ctrl-c-to-the-foreground-group", "sigterm-to-carsync"],
)
def test_carsync_ui_stops_everything_it_started_on_the_first_signal(
    data_dir: Path, tmp_path: Path, how: str, code: int
) -> None:
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "carsync_dagster", "ui", "--port", str(port)],
        env=_embedded_env(data_dir), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        process_group=0,  # a terminal's foreground job: a process group of its own
    )  # fmt: skip
    started: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if ui.poll() is not None:
                raise AssertionError(f"carsync ui exited: {ui.communicate()[1].decode()}")
            return httpx.get(f"{base}/server_info").is_success

        wait_for("the UI", 120, up)
        postmaster = _postmaster(data_dir)
        assert postmaster is not None
        started = psutil.Process(ui.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in started]
        assert any("carsync_dagster.simulator" in command for command in commands), commands
        assert any("dagster dev" in command for command in commands), commands
        assert any("dagster_webserver" in command for command in commands), commands
        # Only carsync is in the terminal's foreground group: it decides when its children stop.
        assert [c.pid for c in started if os.getpgid(c.pid) == ui.pid] == []

        if how == "ctrl-c":
            os.killpg(ui.pid, signal.SIGINT)  # what a terminal does on Ctrl+C
        else:
            ui.terminate()
        out, err = ui.communicate(timeout=30)

        assert ui.returncode == code, err.decode()
        assert [child.pid for child in started if _running(child)] == []
        assert _stopped(data_dir, postmaster)  # carsync ui was its last user
        assert "Traceback" not in err.decode(), err.decode()
        assert "Traceback" not in out.decode(), out.decode()
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.communicate()
        for child in started:
            with suppress(psutil.NoSuchProcess):
                child.kill()
