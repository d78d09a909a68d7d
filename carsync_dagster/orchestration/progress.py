"""Throttled progress of a sync stage into `sync_runs`, where the CLI and apps read it."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

from carsync_dagster.source.client import Page, RequestStats
from carsync_dagster.warehouse import syncs

_EVERY_SECONDS = 1.0
# A line in the run's event log this often, so a long but healthy step never looks stale.
_HEARTBEAT_SECONDS = 30.0


class Progress:
    def __init__(
        self,
        conn: psycopg.Connection,
        schema: str,
        sync_id: str,
        stage: str,
        total: int,
        stats: RequestStats | None = None,
        heartbeat: Callable[[str], None] | None = None,
    ) -> None:
        self._conn, self._schema, self._sync_id = conn, schema, sync_id
        self._stats = stats
        self._heartbeat = heartbeat
        self._heartbeat_at = self._started = time.monotonic()
        self.pages_per_second: dict[int, int] = {}
        self.stage, self.total = stage, total
        self.done = self.pages = self.records = 0
        self._written_at = 0.0
        self.flush()

    def page_done(self, page: Page) -> None:
        second = int(time.monotonic() - self._started)
        self.pages_per_second[second] = self.pages_per_second.get(second, 0) + 1
        self.done += 1
        self.pages += 1
        self.records += page.record_count
        self._maybe_flush()

    def step_done(self) -> None:
        self.done += 1
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._written_at >= _EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._written_at = time.monotonic()
        if self._heartbeat and self._written_at - self._heartbeat_at >= _HEARTBEAT_SECONDS:
            self._heartbeat_at = self._written_at
            self._heartbeat(f"{self.stage}: {self.done}/{self.total} done")
        counts = {"pages": self.pages, "records": self.records} if self.stage == "fetch" else {}
        requests = {}
        if self._stats is not None:
            requests = {
                "retries": self._stats.retries,
                "rate_limited": self._stats.by_class.get("429", 0),
                "p95_ms": round(self._stats.percentile(0.95, recent=True) * 1000, 1),
            }
        syncs.record_progress(
            self._conn,
            self._schema,
            self._sync_id,
            stage=self.stage,
            done=self.done,
            total=self.total,
            requests=requests,
            **counts,
        )


def throughput_chart(pages_per_second: dict[int, int], width: int = 40, rows: int = 30) -> str:
    """Pages/s over the fetch, at most `rows` bars, as a Markdown chart for the Dagster UI."""
    if not pages_per_second:
        return "_no pages fetched_"
    span = -(-(max(pages_per_second) + 1) // rows)  # seconds per bar
    bars = [
        sum(pages_per_second.get(second, 0) for second in range(start, start + span)) / span
        for start in range(0, max(pages_per_second) + 1, span)
    ]
    peak = max(bars)
    lines = ["| from second | pages/s | |", "|---:|---:|:---|"]
    for number, rate in enumerate(bars):
        lines.append(f"| {number * span} | {rate:.0f} | {'█' * round(width * rate / peak)} |")
    return "\n".join(lines)
