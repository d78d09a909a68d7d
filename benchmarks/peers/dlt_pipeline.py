"""dlt's rest_api source loading GET /cars into PostgreSQL (issue 7's "dlt" peer).

Runs in the benchmark's own virtualenv (dlt is no dependency of carsync):

    API_KEY=... API_BASE_URL=http://... DATABASE_URL=postgresql://... \\
        python dlt_pipeline.py --schema peer_dlt --pipelines-dir /tmp/x

Merges on the primary key id into <schema>.cars (nested fields become columns, images a child
table). The key is read from API_KEY only. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Before dlt is imported: no telemetry (this machine reaches no such host), and errors only: it
# warns at length about columns that were null on every row of a load (generation, manufacturer).
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")

import dlt  # type: ignore[import-not-found]
from dlt.sources.rest_api import rest_api_source  # type: ignore[import-not-found]


def usable(record: Any) -> bool:
    # A record without an id cannot be merged: dlt would fail the load on a null primary key.
    return isinstance(record, dict) and isinstance(record.get("id"), str) and bool(record["id"])


def credentials(url: str) -> str:
    """The URL with the password and host that dlt insists on, placeholders where it has none.

    A server with trust or peer auth (local, embedded) never asks for the password, and libpq
    prefers a `?host=/socket/dir` in the query (the embedded server's form) to the URL's host.
    """
    parts = urlsplit(url)
    if parts.password and parts.hostname:
        return url
    host = parts.netloc.rpartition("@")[2]  # as written: [::1]:5432, :5432 or nothing
    netloc = f"{parts.username or 'postgres'}:{parts.password or 'unused'}@"
    return urlunsplit(
        parts._replace(netloc=netloc + ("" if parts.hostname else "localhost") + host)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("API_BASE_URL"))
    parser.add_argument("--schema", default="peer_dlt")
    parser.add_argument("--pipelines-dir", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    source = rest_api_source(
        {
            "client": {
                "base_url": args.base_url,
                "headers": {"X-API-Key": os.environ["API_KEY"]},
                "paginator": {
                    "type": "page_number",
                    "base_page": 1,
                    "page_param": "page",
                    "total_path": "meta.last_page",
                },
            },
            "resource_defaults": {"primary_key": "id", "write_disposition": "merge"},
            "resources": [
                {
                    "name": "cars",
                    "endpoint": {
                        "path": "cars",
                        "params": {"per_page": 100},
                        "data_selector": "data",
                    },
                    "processing_steps": [{"filter": usable}],
                }
            ],
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="carsync_bench_dlt",
        pipelines_dir=args.pipelines_dir,
        destination=dlt.destinations.postgres(credentials=credentials(os.environ["DATABASE_URL"])),
        dataset_name=args.schema,
    )
    pipeline.run(source)
    trace = pipeline.last_trace
    rows = trace.last_normalize_info.row_counts if trace and trace.last_normalize_info else {}
    summary = {
        "rows": rows.get("cars", 0),
        "child_rows": sum(n for table, n in rows.items() if table.startswith("cars__")),
        "dlt_version": dlt.__version__,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
