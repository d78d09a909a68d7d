"""SIGINT (Ctrl+C) and SIGTERM: a request to stop a sync, not an exception at a random line.

Dagster turns both signals into an exception raised wherever the main thread is, which can be
half-way through a database statement (psycopg then leaves the connection busy). While the
sync's pipeline runs, `deferred` takes the signals instead: the step stops at its next event,
with the merges in flight committed. `received_signals` tells the CLI which signals arrived,
whoever handled them, for its exit code (128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[threading.Event]:
    """An event set when SIGINT or SIGTERM arrives while the block runs; a second signal goes
    to the handler before (main thread only; elsewhere signals keep their handlers)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask_to_stop(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            return
        # Asked twice: stop now, the way the signal's previous handler does.
        handler = previous[signal.Signals(signum)]
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signum, frame)

    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number in STOP_SIGNALS:
        signal.signal(number, ask_to_stop)
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def received_signals() -> Iterator[Callable[[], list[int]]]:
    """A function returning the signals received so far while the block runs, by any Python
    handler (Python writes each one's number to the wakeup file descriptor)."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    numbers: list[int] = []

    def received() -> list[int]:
        with contextlib.suppress(BlockingIOError):
            while chunk := reader.recv(64):
                numbers.extend(chunk)
        return list(numbers)

    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        yield received
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
