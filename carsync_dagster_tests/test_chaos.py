"""Issue 15: the chaos scenarios, small, on every test run (`pytest -m chaos` runs them alone).

They are the scenarios of `python -m benchmarks chaos` (benchmarks/chaos.py), which runs them at
full size: the real `carsync sync` command against the bundled simulator, each in a fresh
database (the PostgreSQL restarts on a private cluster). Random moments come from a fixed seed,
printed in the output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import chaos
from benchmarks.healing import Context
from carsync_dagster.simulator.data import Store, dumps

CARS = 8_000
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


@pytest.fixture
def ctx(server_url: str, tmp_path: Path) -> Context:
    print(f"chaos seed {chaos.SEED}, {CARS:,} cars")
    return Context(str(Path(sys.executable).with_name("carsync")), server_url, CARS, tmp_path)


def _passed(outcome: dict[str, Any]) -> None:
    figures = {k: v for k, v in outcome.items() if k not in ("passed", "failures")}
    assert outcome["passed"], "\n".join([*outcome["failures"], f"figures: {figures}"])


def test_kill_nine_at_random_moments_then_sync_again(ctx: Context) -> None:
    _passed(chaos.kill_nine(ctx, chaos.SEED))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarts_mid_merge(ctx: Context, mode: str) -> None:
    _passed(chaos.postgres_restart(ctx, chaos.SEED, mode))


@pytest.mark.parametrize("how", ["no_data", "not_json", "bad_utf8"])
def test_poison_page(ctx: Context, how: str) -> None:
    _passed(chaos.poison_page(ctx, how))


def test_a_thousand_bad_records(ctx: Context) -> None:
    _passed(chaos.bad_records(ctx))


def test_pathological_values(ctx: Context) -> None:
    _passed(chaos.pathological(ctx))


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_interrupted_then_resumed(ctx: Context, name: str) -> None:
    _passed(chaos.interrupted(ctx, chaos.SEED, name))


def test_the_simulator_serves_pathological_values_and_expects_them_rejected() -> None:
    store = Store(1200, 3, 0.0, pathological=6)
    odd = sorted(store.pathological)
    assert len(odd) == 6
    served = [store.record(i) for i in odd]
    truth = [store.truth(i) for i in odd]
    assert not any(ok for ok, _ in truth), "every one is expected in cars_rejected"
    assert served[0]["year"] == "x" * 5_000_000
    nested, depth = served[1]["mileage"]["value"], 0
    while isinstance(nested, list):
        nested, depth = nested[0], depth + 1
    assert depth == 500
    assert served[2]["mileage"]["unit"] == "km\x00"
    assert truth[2][1]["raw"]["mileage"]["unit"] == "km\ufffd"  # as jsonb keeps it
    assert served[3] is True and truth[3][1]["id"] is None
    assert served[4]["year"] == 2**70 and served[5]["price"]["amount"] == -(2**64 + 1)
    # A page holding them is still JSON, integers past 64 bits exact.
    page, _ = store.page(1, 1200, None, None)
    assert json.loads(dumps({"data": page}))["data"][1200 - 1 - odd[4]]["year"] == 2**70
