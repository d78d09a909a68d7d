"""A person's view: `carsync ui` in headless Chromium (Debian's, driven by Playwright). The asset
graph shows the chain, the partitions page shows partition status, and a backfill of two
partitions launched from the UI materialises them. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from carsync_dagster.simulator.process import start_simulator
from carsync_dagster_tests.conftest import carsync_env
from carsync_dagster_tests.ui_process import carsync_ui, graphql, wait_for

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHAIN = ("pages", "normalised", "cars", "recent_changes", "vanished_listings")
STATUS_QUERY = """{ assetNodeOrError(assetKey: {path: ["pages"]}) { ... on AssetNode {
  partitionKeys
  assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions } } } } }"""


@pytest.fixture
def ui(database_url: str, tmp_path: Path) -> Iterator[str]:
    with start_simulator(cars=5_000, seed=41) as simulator:
        env = carsync_env(tmp_path, database_url, simulator, CARSYNC_PARTITION_SIZE="1000")
        with carsync_ui(env, tmp_path) as (base, _):
            yield base


def _mark_welcome_seen(ui: str) -> None:
    """The UI's "Join the Dagster community" dialog opens on a timer over whatever is open, and
    a handler that clicked it away hung once behind the launch dialog: tell the instance it was
    seen, as its own Skip button does, so it never opens."""
    graphql(ui, "mutation { setNuxSeen }")
    assert graphql(ui, "{ shouldShowNux }") == {"shouldShowNux": False}


def test_a_person_sees_the_lineage_and_backfills_two_partitions(ui: str) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is installed by .ci/run"
    ARTIFACTS.mkdir(exist_ok=True)
    # The discovery sensor, run by the daemon `carsync ui` starts, registers the listing ranges.
    keys = wait_for(
        "the discovery sensor",
        120,
        lambda: graphql(ui, STATUS_QUERY)["assetNodeOrError"]["partitionKeys"],
    )
    assert keys == [
        "0000001-0001000",
        "0001001-0002000",
        "0002001-0003000",
        "0003001-0004000",
        "0004001-0005000",
    ]

    _mark_welcome_seen(ui)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{ui}/asset-groups", wait_until="networkidle", timeout=60_000)
        page.wait_for_timeout(2000)
        body = page.inner_text("body")
        assert all(name in body for name in CHAIN), body[:500]
        page.screenshot(path=str(ARTIFACTS / "lineage.png"))

        page.goto(f"{ui}/assets/pages?view=partitions", wait_until="networkidle", timeout=60_000)
        page.wait_for_timeout(2000)
        body = page.inner_text("body")
        assert "0000001-0001000" in body and "Missing" in body, body[:800]
        page.screenshot(path=str(ARTIFACTS / "partitions-before.png"))

        page.goto(f"{ui}/assets/pages", wait_until="networkidle", timeout=60_000)
        page.get_by_role("button", name="Materialize", exact=False).first.click()
        page.get_by_text("Select a partition or create one").click()
        for key in ("0000001-0001000", "0001001-0002000"):
            page.get_by_role("menuitem", name=key).click()
        page.keyboard.press("Escape")
        page.screenshot(path=str(ARTIFACTS / "backfill-dialog.png"))
        page.get_by_role("button", name="Launch backfill").click()

        materialized = wait_for(
            "the backfill",
            180,
            lambda: (
                set(
                    graphql(ui, STATUS_QUERY)["assetNodeOrError"]["assetPartitionStatuses"][
                        "materializedPartitions"
                    ]
                )
                >= {"0000001-0001000", "0001001-0002000"}
            ),
        )
        assert materialized
        page.goto(f"{ui}/assets/pages?view=partitions", wait_until="networkidle", timeout=60_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "partitions-after.png"))
        browser.close()
    statuses = graphql(ui, STATUS_QUERY)["assetNodeOrError"]["assetPartitionStatuses"]
    assert sorted(statuses["materializedPartitions"]) == ["0000001-0001000", "0001001-0002000"]
