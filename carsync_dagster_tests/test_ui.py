"""`carsync ui` serves the Dagster UI on the carsync instance, with the asset lineage."""

from __future__ import annotations

import os
from pathlib import Path

from carsync_dagster_tests.ui_process import carsync_ui, graphql, leftovers

LINEAGE_QUERY = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"


def test_ui_serves_the_asset_lineage(database_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARSYNC_", "API_"))}
    env.update(
        DATABASE_URL=database_url,
        API_BASE_URL="http://127.0.0.1:9",
        API_KEY="ui-test-key",
        DAGSTER_HOME=str(tmp_path / "dagster"),
        CARSYNC_DATA_DIR=str(tmp_path / "data"),
    )
    with carsync_ui(env, tmp_path) as (base, process):
        nodes = graphql(base, LINEAGE_QUERY)["assetNodes"]
        port = int(base.rsplit(":", 1)[1])
        upstream = {
            node["assetKey"]["path"][0]: [key["path"][0] for key in node["dependencyKeys"]]
            for node in nodes
        }
        assert upstream == {
            "pages": [],
            "normalised": ["pages"],
            "cars": ["normalised"],
            "recent_changes": ["cars"],
            "vanished_listings": ["recent_changes"],
        }
        process.terminate()  # SIGTERM to `carsync ui` alone: it must stop what it started
        process.wait(timeout=60)
        assert leftovers(port) == [], "dagster dev, webserver or daemon left running"
