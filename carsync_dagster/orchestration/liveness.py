"""Is a run's worker process alive? Host, pid and the process's start time together: a pid
alone may belong to another process after a reboot, and a worker on another host (a Kubernetes
pod, say) is left to Dagster's run monitoring and never signalled from here."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Worker:
    host: str
    pid: int
    started: float  # the process's start time (seconds since the epoch, 10 ms resolution)

    @classmethod
    def this_process(cls) -> Worker:
        return cls(socket.gethostname(), os.getpid(), _start_time(psutil.Process()))

    @classmethod
    def from_tag(cls, tag: str | None) -> Worker | None:
        try:
            host, pid, started = (tag or "").split(" ")
            return cls(host, int(pid), float(started))
        except ValueError:
            return None

    @property
    def tag(self) -> str:
        return f"{self.host} {self.pid} {self.started:.2f}"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Only meaningful on this host: the process with this pid is the one that started
        then, and it is not a zombie (killed, not yet reaped)."""
        process = self._process()
        try:
            return process is not None and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def kill(self) -> None:
        """End the worker and every process it started, if it still is that worker."""
        process = self._process()
        if process is None or process.pid == os.getpid():
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            family = [*process.children(recursive=True), process]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()

    def _process(self) -> psutil.Process | None:
        if not self.on_this_host:
            return None
        try:
            process = psutil.Process(self.pid)
            return process if _start_time(process) == round(self.started, 2) else None
        except psutil.NoSuchProcess:
            return None


def _start_time(process: psutil.Process) -> float:
    return round(process.create_time(), 2)
