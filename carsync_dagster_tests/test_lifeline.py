"""A step process ends when its run worker is killed (real processes, no Dagster needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

# A stand-in run worker: starts a step process the way Dagster's multiprocess executor does
# (multiprocessing, spawn), prints its pid, and waits.
WORKER = """
import multiprocessing, sys, time
from carsync_dagster.orchestration.lifeline import exit_with_run_worker

def step(watch):
    if watch:
        exit_with_run_worker()
    time.sleep(120)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=step, args=(sys.argv[1] == "1",))
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


def _orphan_after_killing_worker(tmp_path: Path, watch: bool) -> psutil.Process:
    script = tmp_path / "worker.py"  # spawn re-imports __main__, so it must be a file
    script.write_text(WORKER)
    worker = subprocess.Popen(
        [sys.executable, str(script), "1" if watch else "0"], stdout=subprocess.PIPE, text=True
    )
    assert worker.stdout is not None
    with worker.stdout:
        step = psutil.Process(int(worker.stdout.readline()))
    time.sleep(1)  # let the step start watching
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    return step


def test_a_step_process_exits_when_its_run_worker_is_killed(tmp_path: Path) -> None:
    step = _orphan_after_killing_worker(tmp_path, watch=True)
    step.wait(timeout=5)  # raises if it is still running


def test_without_the_lifeline_the_step_would_outlive_its_worker(tmp_path: Path) -> None:
    step = _orphan_after_killing_worker(tmp_path, watch=False)
    try:
        time.sleep(1)
        assert step.is_running(), "the failure the lifeline exists for"
    finally:
        step.kill()
