"""HTTP client of the listings API (source-api.md): pages in, plain records out."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import orjson

from carsync_dagster.source.errors import (
    ApiAuthError,
    ApiConfigError,
    ApiError,
    RetryableApiError,
)

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Page:
    number: int
    records: list[Any]
    last_page: int
    total: int
    body: bytes
    seconds: float


@dataclass
class RequestStats:
    """What the client did, for metadata and the progress line."""

    requests: int = 0
    retries: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def count(self, error_class: str) -> None:
        self.by_class[error_class] = self.by_class.get(error_class, 0) + 1

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def parse_json(body: bytes) -> Any:
    """orjson, falling back to the stdlib for what orjson refuses (ints over 64 bits, NaN)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def parse_page(number: int, body: bytes, seconds: float) -> Page:
    try:
        payload = parse_json(body)
    except ValueError as error:
        raise RetryableApiError(f"page {number}: body is not complete JSON ({error})") from None
    if not isinstance(payload, dict):
        raise RetryableApiError(f"page {number}: body is not a JSON object")
    data, meta = payload.get("data"), payload.get("meta")
    if not isinstance(data, list) or not isinstance(meta, dict):
        raise RetryableApiError(f"page {number}: body has no data list and meta object")
    try:
        last_page, total = int(meta["last_page"]), int(meta["total"])
    except (KeyError, TypeError, ValueError):
        raise RetryableApiError(f"page {number}: meta lacks last_page/total") from None
    return Page(number, data, last_page, total, body, seconds)


class ListingsClient:
    """Owns one httpx connection pool, the key header, timeouts and retries."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int = 16,
        timeout: float = 30.0,
        max_attempts: int = 8,
        max_backoff: float = 30.0,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"X-API-Key": api_key, "Accept": "application/json"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._deadline = timeout
        self._max_attempts = max_attempts
        self._max_backoff = max_backoff
        self.stats = RequestStats()

    async def __aenter__(self) -> ListingsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def get_page(self, number: int, per_page: int, updated_since: str | None = None) -> Page:
        params: dict[str, str | int] = {"page": number, "per_page": per_page}
        if updated_since is not None:
            params["updated_since"] = updated_since
        for attempt in range(1, self._max_attempts + 1):
            started = time.perf_counter()
            try:
                body = await self._get("/cars", params)
                return parse_page(number, body, time.perf_counter() - started)
            except RetryableApiError as error:
                if attempt == self._max_attempts:
                    raise ApiError(
                        f"page {number}: gave up after {attempt} attempts: {error}"
                    ) from None
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt, error.retry_after))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after + random.uniform(0, 0.25)
        # Exponential with full jitter, so concurrent retries spread out.
        return random.uniform(0, min(self._max_backoff, 0.1 * 2**attempt))

    async def _get(self, path: str, params: dict[str, str | int]) -> bytes:
        async with self._slots:
            self.stats.requests += 1
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._deadline):
                    response = await self._client.get(path, params=params)
                    body = response.content
            except (httpx.TransportError, TimeoutError) as error:
                # The exception's text is safe (no headers), but keep just its class name.
                kind = (
                    "timeout"
                    if isinstance(error, TimeoutError | httpx.TimeoutException)
                    else "connection"
                )
                self.stats.count(kind)
                raise RetryableApiError(f"{path}: {kind} error ({type(error).__name__})") from None
            finally:
                self.stats.latencies.append(time.perf_counter() - started)
        return self._check(path, response.status_code, response.headers, body)

    def _check(self, path: str, status: int, headers: httpx.Headers, body: bytes) -> bytes:
        if status == 200:
            if "html" in headers.get("content-type", ""):
                self.stats.count("html")
                raise RetryableApiError(f"{path}: got an HTML page instead of JSON")
            return body
        if status in (401, 403):
            self.stats.count("auth")
            raise ApiAuthError(
                f"{path}: HTTP {status} from the API: check API_KEY (the key is not accepted)"
            )
        if status == 400:
            self.stats.count("config")
            raise ApiConfigError(f"{path}: HTTP 400 from the API: {_error_text(body)}")
        if status in _RETRY_STATUSES:
            self.stats.count(str(status))
            raise RetryableApiError(f"{path}: HTTP {status}", retry_after=_retry_after(headers))
        self.stats.count(str(status))
        raise ApiError(f"{path}: unexpected HTTP {status} from the API")


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return max(0.0, float(headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _error_text(body: bytes) -> str:
    try:
        return str(parse_json(body).get("error", ""))[:200]
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
