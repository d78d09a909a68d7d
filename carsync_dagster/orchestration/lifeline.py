"""Step processes end with the run worker that started them.

Dagster's multiprocess executor runs each step in a child process. When the run worker is killed
(kill -9, OOM), the code server fails the run, but the child would carry on fetching and merging
while a retry of the same partitions starts: two writers. The child watches its parent instead."""

import multiprocessing
import os
import threading
from multiprocessing.connection import wait

_watching = threading.Lock()


def exit_with_run_worker() -> None:
    """In a step process, exit at once when its parent (the run worker) is gone. In-process
    execution (`carsync sync`, the in-process executor) has no such parent and is left alone."""
    parent = multiprocessing.parent_process()
    if parent is None or not _watching.acquire(blocking=False):
        return

    def watch() -> None:
        wait([parent.sentinel])  # readable once the parent's end of the pipe is closed
        os._exit(70)  # EX_SOFTWARE: no cleanup that could write on the dead run's behalf

    threading.Thread(target=watch, name="carsync-lifeline", daemon=True).start()
