"""The floor under every tool: read every page of GET /cars and throw it away.

httpx, 16 requests in flight, pages of 100, nothing parsed or stored, no retries: how long the
simulator takes to serve the feed on this machine, which no tool that reads it can beat. Run as
its own process with API_KEY and API_BASE_URL set; ends with one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx

IN_FLIGHT, PER_PAGE = 16, 100


async def read_every_page(base_url: str, key: str) -> tuple[int, int]:
    """(pages, bytes) read."""
    headers, limits = {"X-API-Key": key}, httpx.Limits(max_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:
        first = await client.get("/cars", params={"per_page": PER_PAGE})
        last_page = int(first.raise_for_status().json()["meta"]["last_page"])
        pages = iter(range(1, last_page + 1))  # shared by the workers: each page is read once
        read = 0

        async def worker() -> None:
            nonlocal read
            for page in pages:
                response = await client.get("/cars", params={"page": page, "per_page": PER_PAGE})
                read += len(response.raise_for_status().content)

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return last_page, read


def main() -> None:
    started = time.perf_counter()
    pages, read = asyncio.run(read_every_page(os.environ["API_BASE_URL"], os.environ["API_KEY"]))
    seconds = round(time.perf_counter() - started, 2)
    print(json.dumps({"pages": pages, "bytes": read, "seconds": seconds}))


if __name__ == "__main__":
    main()
