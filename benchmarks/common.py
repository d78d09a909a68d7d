"""What the benchmark commands share: the hostile API profile and the peers' virtualenv."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

HOSTILE = (
    "--error-rate", "0.05", "--overload-429", "0.05", "--truncate-rate", "0.01",
    "--html-rate", "0.01", "--hang-rate", "0.01", "--hang-seconds", "30",
)  # fmt: skip

PEERS = Path(__file__).parent / "peers"
# dlt and matplotlib live in a virtualenv of their own: neither is a dependency of carsync.
# Pinned so that figures compare across runs; the virtualenv is rebuilt when this list changes.
PEERS_VENV = Path(__file__).parent / ".peers-venv"
PEERS_REQUIREMENTS = ("dlt[postgres]==1.31.0", "matplotlib==3.11.2")


def peers_python() -> Path:
    """The python of the peers' virtualenv, made (once per requirement list) when missing."""
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / "requirements.txt"
    wanted = "\n".join(PEERS_REQUIREMENTS) + "\n"
    with open(f"{PEERS_VENV}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmarks started at once build it once
        if python.exists() and stamp.exists() and stamp.read_text() == wanted:
            return python
        print(f"installing {', '.join(PEERS_REQUIREMENTS)} into {PEERS_VENV}", file=sys.stderr)
        shutil.rmtree(PEERS_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        pip = [str(PEERS_VENV / "bin" / "pip"), "install", "-q", *PEERS_REQUIREMENTS]
        installed = subprocess.run(pip, capture_output=True, text=True, check=False)
        for line in (installed.stdout + installed.stderr).splitlines():
            if "is ignored" not in line:  # the local package index warns per folder it lacks
                print(line, file=sys.stderr)
        if installed.returncode != 0:
            raise SystemExit(f"pip install into {PEERS_VENV} failed")
        stamp.write_text(wanted)
    return python
