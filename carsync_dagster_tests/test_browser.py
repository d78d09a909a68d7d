"""A person's view: `carsync ui` in headless Chromium (Debian's, driven by Playwright). The asset
graph shows the chain, the partitions page shows partition status, and a backfill of two
partitions launched from the UI materialises them. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from carsync_dagster.simulator.process import start_simulator
from carsync_dagster_tests.conftest import carsync_env

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHAIN = ("pages", "normalised", "cars", "recent_changes", "vanished_listings")
STATUS_QUERY = """{ assetNodeOrError(assetKey: {path: ["pages"]}) { ... on AssetNode {
  partitionKeys
  assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions } } } } }"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _graphql(base: str, query: str) -> dict[str, Any]:
    response = httpx.post(f"{base}/graphql", json={"query": query}, timeout=10)
    response.raise_for_status()
    data: dict[str, Any] = response.json()["data"]
    return data


def _wait_for(what: str, seconds: float, check: Any) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@pytest.fixture
def ui(database_url: str, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    with start_simulator(cars=5_000, seed=41) as simulator:
        env = carsync_env(tmp_path, database_url, simulator, CARSYNC_PAGES_PER_PARTITION="10")
        process = subprocess.Popen(
            [sys.executable, "-m", "carsync_dagster", "ui", "--port", str(port)],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_for("the UI", 90, lambda: httpx.get(f"{base}/server_info").is_success)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _dismiss_welcome(page: Page) -> None:
    page.wait_for_timeout(1500)
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.click()


def test_a_person_sees_the_lineage_and_backfills_two_partitions(ui: str) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is installed by .ci/run"
    ARTIFACTS.mkdir(exist_ok=True)
    # The discovery sensor, run by the daemon `carsync ui` starts, registers the page ranges.
    keys = _wait_for(
        "the discovery sensor",
        120,
        lambda: _graphql(ui, STATUS_QUERY)["assetNodeOrError"]["partitionKeys"],
    )
    assert keys == ["p00001-00010", "p00011-00020", "p00021-00030", "p00031-00040", "p00041-00050"]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{ui}/asset-groups", wait_until="networkidle", timeout=60_000)
        _dismiss_welcome(page)
        page.wait_for_timeout(2000)
        body = page.inner_text("body")
        assert all(name in body for name in CHAIN), body[:500]
        page.screenshot(path=str(ARTIFACTS / "lineage.png"))

        page.goto(f"{ui}/assets/pages?view=partitions", wait_until="networkidle", timeout=60_000)
        page.wait_for_timeout(2000)
        body = page.inner_text("body")
        assert "p00001-00010" in body and "Missing" in body, body[:800]
        page.screenshot(path=str(ARTIFACTS / "partitions-before.png"))

        page.goto(f"{ui}/assets/pages", wait_until="networkidle", timeout=60_000)
        page.get_by_role("button", name="Materialize", exact=False).first.click()
        page.get_by_text("Select a partition or create one").click()
        for key in ("p00001-00010", "p00011-00020"):
            page.get_by_role("menuitem", name=key).click()
        page.keyboard.press("Escape")
        page.screenshot(path=str(ARTIFACTS / "backfill-dialog.png"))
        page.get_by_role("button", name="Launch backfill").click()

        materialized = _wait_for(
            "the backfill",
            180,
            lambda: (
                set(
                    _graphql(ui, STATUS_QUERY)["assetNodeOrError"]["assetPartitionStatuses"][
                        "materializedPartitions"
                    ]
                )
                >= {"p00001-00010", "p00011-00020"}
            ),
        )
        assert materialized
        page.goto(f"{ui}/assets/pages?view=partitions", wait_until="networkidle", timeout=60_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "partitions-after.png"))
        browser.close()
    statuses = _graphql(ui, STATUS_QUERY)["assetNodeOrError"]["assetPartitionStatuses"]
    assert sorted(statuses["materializedPartitions"]) == ["p00001-00010", "p00011-00020"]
