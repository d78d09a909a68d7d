"""`python -m benchmarks chaos`: the chaos scenarios of issue 15, with figures.

Each scenario runs the real `carsync sync` command (a subprocess) against the bundled simulator
and a fresh database, does to it what the world does (kill -9, a PostgreSQL restart, poison
pages, bad and pathological records, Ctrl-C and SIGTERM, a long hostile soak) and checks what it
must leave behind: the warehouse exactly as the simulator's truth, one line on stderr, the exit
code, the pages spent. Each returns its figures, `passed`, and `failures` saying what was wrong.

carsync_dagster_tests/test_chaos.py runs scenarios 1-6 small on every test run; this command runs
them at full size (200,000 cars) and the 1,000,000-car soak, prints one table and writes JSON
with --output. Random moments come from --seed, which is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from benchmarks.common import HOSTILE, PEERS, peers_python
from benchmarks.healing import Context, Run, rows_wrong
from carsync_dagster.ranges import listing_range, partition_keys
from carsync_dagster.simulator.data import car_id
from carsync_dagster.simulator.process import RunningSimulator
from carsync_dagster_tests.private_postgres import PrivatePostgres
from carsync_dagster_tests.warehouse_truth import differences, rejected_rows

SEED = 15
PAGE_SIZE = 100
CONCURRENCY = 2  # requests in flight in every scenario: what a kill can waste stays small
FETCH_SECONDS = 8.0  # the simulator's latency stretches a slowed sync's fetch to this at least
PAGES_LIMIT = 1.3  # every attempt of a killed sync together, against one sync's pages
BAD_RECORDS = 1000
PATHOLOGICAL = 12  # two of each kind (carsync_dagster/simulator/data.py PATHOLOGICAL)
SOAK_CARS = 1_000_000
SOAK_GROWTH_LIMIT = 1.1  # peak PSS of the second half against the first
SOAK_PSS_LIMIT_MB = 300
SOAK_PLOT = Path(__file__).resolve().parents[1] / "docs" / "chaos-soak-pss.png"

# Progress lines (cli._print_progress); every other line of stderr is something carsync said.
_PROGRESS = re.compile(r"^(starting  \d|\w+ +\d+/\d+ (pages|partitions)  )")
_UNSAFE = re.compile(
    r"Traceback \(most recent call last\)|^\s+File \"|\[SQL: |^LINE \d+:|"
    r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|COPY \w|ON CONFLICT|CREATE TABLE|"
    r"ALTER TABLE)\b"
)
_INTERRUPTED = re.compile(
    r"interrupted: (\d+) of (\d+) listing ranges merged; run carsync sync again to resume"
)


# ---- the feed's shape ----------------------------------------------------------------------


def pages(cars: int) -> int:
    return math.ceil(cars / PAGE_SIZE)


def partition_size(cars: int) -> int:
    """Listings per range: 5,000 (the default) at full size, about 40 ranges when smaller."""
    return min(5000, max(PAGE_SIZE, cars // 40 // PAGE_SIZE * PAGE_SIZE))


def ranges(cars: int) -> list[str]:
    return partition_keys(cars, partition_size(cars))


def settings(run: Run, cars: int, **extra: str) -> dict[str, str]:
    return run.env(
        CARSYNC_PAGE_SIZE=str(PAGE_SIZE),
        CARSYNC_PARTITION_SIZE=str(partition_size(cars)),
        CARSYNC_CONCURRENCY=str(CONCURRENCY),
        **extra,
    )


def slowed(cars: int) -> tuple[str, ...]:
    """Simulator latency that stretches a sync's fetch to FETCH_SECONDS at least: at most
    300 ms a request, so even with the simulator's 1.5x jitter no request is hedged (0.5 s)."""
    return ("--latency-ms", f"{min(300.0, FETCH_SECONDS * 1000 * CONCURRENCY / pages(cars)):.0f}")


def timeout(cars: int) -> float:
    """Generous: what one sync may take before it is taken for hung (never a figure)."""
    return 300 + cars / 200


# ---- a sync in the background --------------------------------------------------------------


@dataclasses.dataclass
class Ended:
    code: int | None  # None: it did not end in time and was killed
    stderr: str
    summary: dict[str, Any]

    def said(self) -> list[str]:
        """stderr without the progress lines: what carsync had to say."""
        lines = self.stderr.splitlines()
        return [line for line in lines if line.strip() and not _PROGRESS.match(line)]

    def unsafe(self) -> list[str]:
        """Lines nobody running a sync should see: a traceback, SQL."""
        return [line for line in self.stderr.splitlines() if _UNSAFE.search(line)]


class Sync:
    """`carsync sync --json` started in the background, its output kept in files."""

    def __init__(self, run: Run, env: dict[str, str]) -> None:
        self.since = time.time()
        name = f"sync-{uuid.uuid4().hex[:8]}"
        self._stdout, self._stderr = run.folder / f"{name}.out", run.folder / f"{name}.err"
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [run.carsync, "sync", "--json"], env=env, cwd=run.folder, stdout=out, stderr=err
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def until(self, count: Callable[[float], int], at_least: int, seconds: float) -> bool:
        """Poll until count(since this sync started) >= at_least; False if the sync ended first
        (the moment passed) or it took longer than `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.running():
            if count(self.since) >= at_least:
                return True
            time.sleep(0.01)
        return False

    def wait(self, seconds: float) -> Ended:
        try:
            code: int | None = self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        lines = self._stdout.read_text(errors="replace").strip().splitlines()
        try:
            summary = json.loads(lines[-1]) if lines else {}
        except ValueError:
            summary = {}
        return Ended(code, self._stderr.read_text(errors="replace"), summary)


def run_sync(run: Run, env: dict[str, str], cars: int) -> Ended:
    return Sync(run, env).wait(timeout(cars))


def merged_since(run: Run, since: float) -> int:
    """Ranges merged (sync_partitions checkpoints) since then (a time.time())."""
    rows = run.query(
        f"SELECT count(*) FROM carsync.sync_partitions WHERE merged_at > to_timestamp({since:.6f})"
    )
    return int(rows[0][0]) if rows else 0


def list_pages(sim: RunningSimulator) -> int:
    """List pages the simulator served since its stats were last reset."""
    return sum(sim.control.stats()["list_pages"].values())


class Verdict:
    """The failures a scenario found; a scenario passes with none."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, holds: bool, failure: str) -> None:
        if not holds:
            self.failures.append(failure)

    def exact(self, sim: RunningSimulator, run: Run, truth: dict[str, Any] | None = None) -> int:
        """Expects the warehouse to be exactly the truth; returns the rows that are not."""
        problems = differences(truth or sim.control.truth(), run.database_url, strict=True)
        shown = [problem[:200] for problem in problems[:3]]
        self.expect(not problems, f"warehouse not exact: {rows_wrong(problems)} rows, {shown}")
        return rows_wrong(problems)

    def exited(self, ended: Ended, code: int, what: str) -> None:
        self.expect(
            ended.code == code,
            f"{what}: exit {ended.code}, not {code}; stderr: {ended.said()[-3:]}",
        )

    def one_line(self, ended: Ended, what: str) -> str:
        """Expects exactly one line on stderr besides progress, and nothing unsafe; returns it."""
        said = ended.said()
        self.expect(len(said) == 1, f"{what}: {len(said)} lines on stderr, not one: {said[:6]}")
        self.safe(ended, what)
        return said[0] if said else ""

    def safe(self, ended: Ended, what: str) -> None:
        unsafe = ended.unsafe()
        self.expect(not unsafe, f"{what}: a traceback or SQL on stderr: {unsafe[:4]}")

    def outcome(self, **figures: Any) -> dict[str, Any]:
        return {**figures, "passed": not self.failures, "failures": self.failures}


# ---- the scenarios -------------------------------------------------------------------------


def kill_nine(ctx: Context, seed: int, moments: int = 4) -> dict[str, Any]:
    """1: kill -9 at random moments of fetch and merge, `carsync sync` again after each: the
    warehouse exact, and every attempt's pages together at most 1.3x one sync's."""
    rng, verdict, total = random.Random(seed), Verdict(), len(ranges(ctx.cars))
    with ctx.fresh("kill9", *slowed(ctx.cars)) as (sim, run):
        env = settings(run, ctx.cars)
        kills: list[dict[str, Any]] = []
        for number in range(moments):
            phase = ("fetch", "merge")[number % 2]
            left = total - (run.landed() if phase == "fetch" else merged_since(run, 0))
            after = rng.randint(1, max(1, left // 3))
            plus = round(rng.uniform(0, 0.25), 3)
            sync = Sync(run, env)
            count = run.landed if phase == "fetch" else functools.partial(merged_since, run)
            if not sync.until(count, after, timeout(ctx.cars)):
                kills.append({"phase": phase, "missed": True, "exit": sync.wait(60).code})
                break  # it ended before the moment: nothing left to interrupt
            time.sleep(plus)
            sync.process.kill()
            sync.wait(60)
            kills.append({"phase": phase, "after_ranges": after, "plus_seconds": plus})
        killed = sum(1 for kill in kills if "missed" not in kill)
        verdict.expect(killed > 0, "every sync ended before its moment: nothing was killed")
        final = run_sync(run, env, ctx.cars)
        verdict.exited(final, 0, "the sync after the kills")
        wrong = verdict.exact(sim, run)
        spent = list_pages(sim)
    ratio = spent / pages(ctx.cars)
    verdict.expect(
        ratio <= PAGES_LIMIT,
        f"{spent} pages requested over the attempts, {ratio:.2f}x one sync's {pages(ctx.cars)}"
        f" (limit {PAGES_LIMIT}x)",
    )
    return verdict.outcome(
        seed=seed, killed=killed, kills=kills, pages_requested=spent,
        one_sync_pages=pages(ctx.cars), pages_ratio=round(ratio, 3), final_exit=final.code,
        partitions_resumed=final.summary.get("partitions_resumed"), rows_wrong=wrong,
    )  # fmt: skip


def postgres_restart(ctx: Context, seed: int, mode: str) -> dict[str, Any]:
    """2: the (private) PostgreSQL restarts mid-merge, `fast` or `immediate` (a crash): the sync
    still exits 0 and is exact, with one line on stderr saying what happened and no traceback
    or SQL."""
    rng, verdict, total = random.Random(seed), Verdict(), len(ranges(ctx.cars))
    after = rng.randint(max(1, total // 4), max(1, total // 2))
    with PrivatePostgres() as pg:
        private = dataclasses.replace(ctx, server_url=pg.url)
        with private.fresh(f"restart_{mode}", *slowed(ctx.cars)) as (sim, run):
            sync = Sync(run, settings(run, ctx.cars))
            merging = sync.until(functools.partial(merged_since, run), after, timeout(ctx.cars))
            verdict.expect(merging, f"the sync ended before {after} ranges merged: no restart")
            merged = merged_since(run, sync.since)
            if merging:
                pg.restart(mode)
            ended = sync.wait(timeout(ctx.cars))
            verdict.exited(ended, 0, f"a sync through a {mode} restart")
            line = verdict.one_line(ended, f"a sync through a {mode} restart")
            verdict.expect(
                not line or re.search(r"(?i)postgres|database|connection", line) is not None,
                f"the line does not say what happened: {line!r}",
            )
            wrong = verdict.exact(sim, run)
    return verdict.outcome(
        seed=seed, mode=mode, ranges=total, merged_at_restart=merged, exit=ended.code,
        stderr_line=line, rows_wrong=wrong,
    )  # fmt: skip


def poison_page(ctx: Context, how: str) -> dict[str, Any]:
    """3: a page 60% into the feed stays broken (server.BREAKAGES): every good record of the
    other listing ranges merged;
    for a page without records (no_data, not_json) one line naming the page and its listing
    range, exit non-zero; a record that is not UTF-8 is quarantined and the sync succeeds."""
    verdict = Verdict()
    page = max(1, int(pages(ctx.cars) * 0.6))
    first = (page - 1) * PAGE_SIZE + 1
    keys = ranges(ctx.cars)
    key = keys[(first - 1) // partition_size(ctx.cars)]
    with ctx.fresh(f"poison_{how}", "--broken-rate", "0") as (sim, run):
        sim.control.break_pages({page: how})
        ended = run_sync(run, settings(run, ctx.cars, CARSYNC_MAX_ATTEMPTS="3"), ctx.cars)
        truth = sim.control.truth()
        # Position p of the feed (1 = newest) is listing number cars - p. A page that stays
        # broken costs its listing range (the self-healing issue's rule), nothing more.
        first_of_range, last_of_range = listing_range(key)
        bad = {car_id(ctx.cars - p) for p in range(first_of_range, last_of_range + 1)}
        if how == "bad_utf8":
            bad = {car_id(ctx.cars - first)}  # its first string, the id, has the bad bytes
            verdict.exited(ended, 0, "a sync meeting a record that is not UTF-8")
            verdict.safe(ended, "a sync meeting a record that is not UTF-8")
            quarantined = run.query(
                "SELECT raw_bytes FROM carsync.cars_rejected WHERE raw_bytes IS NOT NULL"
            )
            verdict.expect(
                len(quarantined) == 1 and b"\xff\xfe" in bytes(quarantined[0][0]),
                f"not one record quarantined with its bytes: {len(quarantined)} rows",
            )
            line = ""
        else:
            verdict.expect(
                ended.code not in (0, None), f"exit {ended.code} with page {page} broken"
            )
            line = verdict.one_line(ended, f"a sync meeting a {how} page")
            verdict.expect(
                re.search(rf"\bpage {page}\b", line) is not None and key in line,
                f"the line does not name page {page} and listing range {key}: {line!r}",
            )
        good = {car["id"] for car in truth["cars"]} - bad
        stored = {row[0] for row in run.query("SELECT id FROM carsync.cars")}
        in_range = good - stored & {
            car_id(ctx.cars - p) for p in range(first_of_range, last_of_range + 1)
        }
        expected = [car for car in truth["cars"] if car["id"] in good]
        wrong = verdict.exact(sim, run, {**truth, "cars": expected})
    return verdict.outcome(
        page=page, listing_range=key, exit=ended.code, stderr_line=line,
        good_missing_in_its_range=len(in_range),
        good_missing_elsewhere=len(good - stored) - len(in_range), rows_wrong=wrong,
    )  # fmt: skip


def bad_records(ctx: Context, count: int = BAD_RECORDS) -> dict[str, Any]:
    """4: about 1,000 broken records (--broken-rate): every one in cars_rejected, none in cars,
    the sync succeeds."""
    verdict = Verdict()
    rate = min(1.0, count / ctx.cars)
    with ctx.fresh("bad_records", "--broken-rate", f"{rate:.6f}") as (sim, run):
        # A small feed holds them at a higher share than the rejected_fraction check allows.
        ended = run_sync(run, settings(run, ctx.cars, CARSYNC_MAX_REJECTED="0.5"), ctx.cars)
        verdict.exited(ended, 0, "a sync with broken records")
        verdict.safe(ended, "a sync with broken records")
        truth = sim.control.truth()
        stored = run.query("SELECT count(*) FROM carsync.cars_rejected")
        wrong = verdict.exact(sim, run, truth)
        distinct = _distinct(truth["rejected"])
        verdict.expect(
            stored == [(distinct,)], f"{stored} rows in cars_rejected for {distinct} bad records"
        )
    return verdict.outcome(
        broken_records=len(truth["rejected"]), distinct=distinct,
        rejected_rows=stored[0][0] if stored else 0, exit=ended.code, rows_wrong=wrong,
    )  # fmt: skip


def _distinct(rejected: list[dict[str, Any]]) -> int:
    """Rows cars_rejected holds for them: one per record, but records alike (two `null` items,
    say) are one row."""
    return len({(bad["id"], json.dumps(bad["raw"], sort_keys=True)) for bad in rejected})


def pathological(ctx: Context, count: int = PATHOLOGICAL) -> dict[str, Any]:
    """5: records with a 5 MB string, nesting 500 deep, a NUL, an item that is not an object,
    integers past 2^64 (simulator --pathological): the good records merged, the bad ones in
    cars_rejected, the sync succeeds with no traceback."""
    verdict = Verdict()
    args = ("--broken-rate", "0", "--pathological", str(count))
    with ctx.fresh("pathological", *args) as (sim, run):
        ended = run_sync(run, settings(run, ctx.cars), ctx.cars)
        verdict.exited(ended, 0, "a sync with pathological values")
        verdict.safe(ended, "a sync with pathological values")
        truth = sim.control.truth()
        wrong = verdict.exact(sim, run, truth)
        stored = run.query("SELECT count(*) FROM carsync.cars_rejected")
        distinct = _distinct(truth["rejected"])
        verdict.expect(stored == [(distinct,)], f"{stored} rows in cars_rejected, not {distinct}")
        kept = {row["id"]: row for row in rejected_rows(run.database_url)}
        for bad in truth["rejected"]:
            row = kept.get(bad["id"])
            if bad["id"] is not None and row is not None and row["raw"] != bad["raw"]:
                verdict.failures.append(
                    f"{bad['id']} ({bad['field']}) kept other than received: reason"
                    f" {row['reason'][:90]!r}, raw {str(row['raw'])[:70]!r}"
                )
    return verdict.outcome(
        pathological=count, distinct=distinct, rejected_rows=stored[0][0] if stored else 0,
        exit=ended.code, stderr=ended.said()[-3:], rows_wrong=wrong,
    )  # fmt: skip


def interrupted(ctx: Context, seed: int, name: str) -> dict[str, Any]:
    """6: SIGINT or SIGTERM mid-sync: exit 130 or 143 with one line saying how many listing
    ranges were merged (in the warehouse, checkpointed); the next `carsync sync` resumes (fewer
    pages than a sync) and is exact."""
    sig = signal.Signals[name]
    rng, verdict, total = random.Random(seed), Verdict(), len(ranges(ctx.cars))
    after = rng.randint(max(1, total // 4), max(1, total // 2))
    with ctx.fresh(f"signal_{name.lower()}", *slowed(ctx.cars)) as (sim, run):
        env = settings(run, ctx.cars)
        sync = Sync(run, env)
        reached = sync.until(run.landed, after, timeout(ctx.cars))
        verdict.expect(reached, f"the sync ended before {after} ranges landed: no {name}")
        if reached:
            sync.process.send_signal(sig)
        ended = sync.wait(timeout(ctx.cars))
        merged = run.query("SELECT count(*) FROM carsync.sync_partitions")[0][0]
        verdict.exited(ended, 128 + sig, f"a sync sent {name}")
        line = verdict.one_line(ended, f"a sync sent {name}")
        said = _INTERRUPTED.search(line)
        verdict.expect(
            said is not None and (int(said[1]), int(said[2])) == (merged, total),
            f"the line does not say `interrupted: {merged} of {total} listing ranges merged;"
            f" run carsync sync again to resume`: {line!r}",
        )
        status = subprocess.run(
            [run.carsync, "status", "--json"], env=env, cwd=run.folder, capture_output=True,
            text=True, timeout=120, check=False,
        )  # fmt: skip
        failed = len(json.loads(status.stdout or "{}").get("failed_listing_ranges", []))
        verdict.expect(
            failed == total - merged,
            f"carsync status lists {failed} listing ranges failed, not the {total - merged} "
            "left unmerged",
        )
        sim.control.reset_stats()
        resumed = run_sync(run, env, ctx.cars)
        spent = list_pages(sim)
        verdict.exited(resumed, 0, "the sync after it")
        verdict.expect(
            spent < pages(ctx.cars),
            f"the next sync requested {spent} pages, not fewer than a whole sync's"
            f" {pages(ctx.cars)}",
        )
        wrong = verdict.exact(sim, run)
    return verdict.outcome(
        seed=seed, signal=name, sent_after_ranges=after, exit=ended.code, stderr_line=line,
        ranges_merged=merged, ranges=total, status_failed=failed, next_sync_pages=spent,
        one_sync_pages=pages(ctx.cars), rows_wrong=wrong,
    )  # fmt: skip


def soak(ctx: Context, cars: int = SOAK_CARS, plot: Path | None = SOAK_PLOT) -> dict[str, Any]:
    """7: a full sync of 1,000,000 cars from the hostile API; the PSS of carsync's processes
    sampled every 0.5 s: the peak of the second half at most 1.1x that of the first, and
    300 MB at most. The curve is drawn to `plot`."""
    verdict = Verdict()
    with dataclasses.replace(ctx, cars=cars).fresh("soak", *HOSTILE) as (_, run):
        sync = Sync(run, run.env())
        started, samples = time.monotonic(), []
        while sync.running():
            samples.append((round(time.monotonic() - started, 1), _family_pss_mb(sync.process)))
            time.sleep(0.5)
        ended = sync.wait(60)
    verdict.exited(ended, 0, "the soak")
    half = len(samples) // 2
    first = max((mb for _, mb in samples[:half]), default=0.0)
    second = max((mb for _, mb in samples[half:]), default=0.0)
    verdict.expect(
        second <= SOAK_GROWTH_LIMIT * first,
        f"peak PSS grew from {first:.0f} MB (first half) to {second:.0f} MB (second half)",
    )
    verdict.expect(second <= SOAK_PSS_LIMIT_MB, f"peak PSS {second:.0f} MB > {SOAK_PSS_LIMIT_MB}")
    figures = {
        "cars": cars, "seconds": samples[-1][0] if samples else 0, "exit": ended.code,
        "peak_pss_first_half_mb": round(first, 1), "peak_pss_second_half_mb": round(second, 1),
        "growth": round(second / first, 3) if first else None,
        "inserted": ended.summary.get("inserted"), "retries": ended.summary.get("retries"),
    }  # fmt: skip
    if plot is not None and samples:
        figures["plot"] = draw_pss(samples, plot, f"carsync sync, {cars:,} cars, hostile API")
    return verdict.outcome(**figures, samples=samples)


def _family_pss_mb(process: subprocess.Popen[bytes]) -> float:
    total = 0
    try:
        root = psutil.Process(process.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += member.memory_full_info().pss
    return round(total / 2**20, 1)


def draw_pss(samples: list[tuple[float, float]], path: Path, title: str) -> str:
    """The PSS curve as a PNG, drawn by matplotlib in the peers' virtualenv."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump({"title": title, "samples": samples}, data)
        data.flush()
        command = [str(peers_python()), str(PEERS / "plots.py"), "--pss", data.name, str(path)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return str(path)


SCENARIOS: dict[str, Callable[[Context, int], dict[str, Any]]] = {
    "kill_9": kill_nine,
    "restart_fast": lambda ctx, seed: postgres_restart(ctx, seed, "fast"),
    "restart_immediate": lambda ctx, seed: postgres_restart(ctx, seed, "immediate"),
    "poison_no_data": lambda ctx, _: poison_page(ctx, "no_data"),
    "poison_not_json": lambda ctx, _: poison_page(ctx, "not_json"),
    "poison_bad_utf8": lambda ctx, _: poison_page(ctx, "bad_utf8"),
    "bad_records": lambda ctx, _: bad_records(ctx),
    "pathological": lambda ctx, _: pathological(ctx),
    "sigint": lambda ctx, seed: interrupted(ctx, seed, "SIGINT"),
    "sigterm": lambda ctx, seed: interrupted(ctx, seed, "SIGTERM"),
}


def report(results: dict[str, dict[str, Any]]) -> None:
    line = "{:<18} {:<5} {}"
    print(line.format("scenario", "pass", "figures"))
    for name, outcome in results.items():
        figures = {
            key: value
            for key, value in outcome.items()
            if key not in ("passed", "failures", "samples") and not isinstance(value, list | dict)
        }
        shown = ", ".join(f"{key} {value}" for key, value in figures.items())
        print(line.format(name, "yes" if outcome["passed"] else "NO", shown))
        for failure in outcome["failures"]:
            print(f"{'':<24}{failure[:400]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks chaos", description=__doc__)
    parser.add_argument("--cars", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=SEED, help="of the random moments")
    parser.add_argument("--carsync", default=str(Path(sys.executable).with_name("carsync")))
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server; each scenario creates and drops a database of its own (the"
        " restarts happen on a private cluster)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", choices=[*SCENARIOS, "soak"], default=None)
    parser.add_argument("--soak-cars", type=int, default=SOAK_CARS, help="0: no soak")
    parser.add_argument("--plot", type=Path, default=SOAK_PLOT, help="the soak's PSS curve")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    soak_size = f"{args.soak_cars:,} cars" if args.soak_cars else "not run"
    print(
        f"chaos seed {args.seed} (--seed to change), {args.cars:,} cars, soak {soak_size}",
        flush=True,
    )
    names = args.only or [*SCENARIOS, *(["soak"] if args.soak_cars else [])]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="carsync-chaos-") as workdir:
        ctx = Context(args.carsync, args.database_url, args.cars, Path(workdir))
        for name in names:
            started = time.monotonic()
            try:
                if name == "soak":
                    outcome = soak(ctx, args.soak_cars or SOAK_CARS, args.plot)
                else:
                    outcome = SCENARIOS[name](ctx, args.seed)
            except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error,
                    httpx.HTTPError) as error:  # fmt: skip
                outcome = {"passed": False, "failures": [f"{type(error).__name__}: {error}"]}
            outcome["scenario_seconds"] = round(time.monotonic() - started, 1)
            results[name] = outcome
            print(f"{name}: {'passed' if outcome['passed'] else 'FAILED'}", file=sys.stderr)
    report(results)
    if args.output:
        args.output.write_text(json.dumps({"seed": args.seed, "cars": args.cars, **results}))
    return 0 if all(outcome["passed"] for outcome in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
