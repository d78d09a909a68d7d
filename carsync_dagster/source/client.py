"""HTTP client of the listings API (source-api.md): pages in, plain records out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import httpx
import msgspec
from httpx_aiohttp import AiohttpTransport

from carsync_dagster.redaction import Redactor, one_line
from carsync_dagster.source.breaker import CircuitBreaker
from carsync_dagster.source.errors import (
    ApiAuthError,
    ApiConfigError,
    ApiError,
    ApiUnreachableError,
    PageUnavailableError,
    RetryableApiError,
)
from carsync_dagster.source.ratelimit import RateControl

_SERVER_ERRORS = frozenset({500, 502, 503, 504})
# A refused connection or an unknown host name is retried this often, half a second apart (an
# API restarting), then the sync stops: a server that is not there will not answer in minutes.
_UNREACHABLE_ATTEMPTS, _UNREACHABLE_PAUSE = 3, 0.5
_ERROR_TEXT_LIMIT = 200  # characters of a server's own words kept in a message
T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    number: int
    records: list[Any]
    last_page: int
    total: int
    body: bytes
    seconds: float
    record_count: int

    def without_records(self) -> Page:
        """The raw body is what gets landed; parsed records cost several times its memory."""
        return replace(self, records=[])


@dataclass
class RequestStats:
    """What the client did, for metadata and the progress line."""

    requests: int = 0
    retries: int = 0
    hedged: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def count(self, error_class: str) -> None:
        self.by_class[error_class] = self.by_class.get(error_class, 0) + 1

    def timed(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.recent.append(seconds)

    def percentile(self, fraction: float, *, recent: bool = False) -> float:
        values = self.recent if recent else self.latencies
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


_json = msgspec.json.Decoder()


def parse_json(body: bytes) -> Any:
    """Every integer exact, as a Python int (orjson would make one beyond 64 bits a float).

    msgspec, as fast as orjson here; the stdlib for what msgspec refuses: NaN, a number beyond a
    float's range, a lone surrogate, and an integer of more digits than Python converts to an
    int (4300), which becomes an exact Decimal.
    """
    try:
        return _json.decode(body)
    except msgspec.DecodeError:
        return json.loads(body, parse_int=_exact_int)


def _exact_int(text: str) -> int | Decimal:
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return Decimal(text)


class _Meta(msgspec.Struct):
    last_page: int
    total: int


class _PageShape(msgspec.Struct):
    data: list[msgspec.Raw]  # each record checked for JSON syntax and counted, never built
    meta: _Meta


_page_shape = msgspec.json.Decoder(_PageShape)


def check_page(number: int, body: bytes, seconds: float) -> Page:
    """A page kept as its raw body: checked as parse_page would, five times faster, because
    no record becomes a Python object (normalise parses them later, from the landing)."""
    try:
        shape = _page_shape.decode(body)
    # What msgspec refuses goes the long way, to the same verdict.
    except (msgspec.DecodeError, RecursionError):
        return parse_page(number, body, seconds).without_records()
    meta = shape.meta
    return Page(number, [], meta.last_page, meta.total, body, seconds, len(shape.data))


class _RawRecords(msgspec.Struct):
    data: list[msgspec.Raw]


_raw_records = msgspec.json.Decoder(_RawRecords)


def page_records(body: bytes) -> list[Any]:
    """The records of a checked page. A record whose bytes are not UTF-8 (JSON's encoding)
    comes back as those bytes, so one bad record costs itself, not its page."""
    try:
        records: list[Any] = parse_json(body)["data"]
        return records
    except UnicodeDecodeError:  # rare: split the page and parse record by record
        return [_record(bytes(raw)) for raw in _raw_records.decode(body).data]


def _record(raw: bytes) -> Any:
    try:
        return parse_json(raw)
    except UnicodeDecodeError:
        return raw


def parse_page(number: int, body: bytes, seconds: float) -> Page:
    try:
        payload = parse_json(body)
    except ValueError:
        raise RetryableApiError(
            f"page {number}: body is not complete JSON", kind="truncated"
        ) from None
    except RecursionError:  # no parser builds it; the page costs its range, not the sync
        raise RetryableApiError(
            f"page {number}: body nests deeper than the JSON parser goes", kind="bad_body"
        ) from None
    if not isinstance(payload, dict):
        raise RetryableApiError(f"page {number}: body is not a JSON object", kind="bad_body")
    data, meta = payload.get("data"), payload.get("meta")
    if not isinstance(data, list) or not isinstance(meta, dict):
        raise RetryableApiError(
            f"page {number}: body has no data list and meta object", kind="bad_body"
        )
    try:
        last_page, total = int(meta["last_page"]), int(meta["total"])
    except (KeyError, TypeError, ValueError):
        raise RetryableApiError(
            f"page {number}: meta lacks last_page/total", kind="bad_body"
        ) from None
    return Page(number, data, last_page, total, body, seconds, len(data))


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8  # per page, probes of an open circuit included
    max_backoff: float = 30.0
    hedge_after: float = 0.5  # at least this long before another copy of a slow request
    max_hedge_after: float = 5.0
    max_copies: int = 3  # of one request in flight at once, the original included
    breaker_failures: int = 10
    breaker_cooldown: float = 60.0


_HEDGE_CONNECTIONS = 4


class ListingsClient:
    """Owns one httpx connection pool, the key header, timeouts, pacing, retries, hedging and
    the circuit breaker. Every request of a run goes through one client, so they share them."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int = 16,
        timeout: float = 30.0,
        rps: float = 0.0,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"X-API-Key": api_key, "Accept": "application/json"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            # A few spare connections, so a hedged copy need not wait for a hung original.
            # aiohttp under httpx's interface: its C HTTP parser and connection pool take 40%
            # less of the client's CPU per page than httpcore's (h11, anyio) at 16 in flight.
            transport=AiohttpTransport(
                limits=httpx.Limits(max_connections=concurrency + _HEDGE_CONNECTIONS)
            ),
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._deadline = timeout
        self.policy = policy or RetryPolicy()
        self.rate = RateControl(rps)
        self.breaker = CircuitBreaker(self.policy.breaker_failures, self.policy.breaker_cooldown)
        self.stats = RequestStats()
        # The client owns the key, so it takes it out of whatever a server says back.
        self._redact = Redactor([api_key])

    async def __aenter__(self) -> ListingsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.rate.pacer.quiet()
        await self._client.aclose()

    async def get_page(
        self,
        number: int,
        per_page: int,
        updated_since: str | None = None,
        *,
        with_records: bool = True,
    ) -> Page:
        """One list page; without records it is only checked, and kept as its raw body."""
        params: dict[str, str | int] = {"page": number, "per_page": per_page}
        if updated_since is not None:
            params["updated_since"] = updated_since
        parse = parse_page if with_records else check_page
        page: Page | None = await self._request(
            "/cars",
            params,
            f"page {number}",
            lambda body, seconds: parse(number, body, seconds),
        )
        assert page is not None  # a list page is never a 404
        return page

    async def get_car(self, car_id: str) -> Any | None:
        """One listing as served, or None when the API says it is gone (404)."""
        return await self._request(
            f"/cars/{quote(car_id, safe='')}", {}, f"car {car_id}", _parse_car, gone_if_404=True
        )

    async def _request(
        self,
        path: str,
        params: dict[str, str | int],
        what: str,
        parse: Callable[[bytes, float], T],
        *,
        gone_if_404: bool = False,
    ) -> T | None:
        """Retries, backoff and the circuit breaker around one logical request."""
        attempts = 0
        while True:
            probe = await self.breaker.admit()
            try:
                answer = await self._hedged(path, params, gone_if_404)
                result = None if answer is None else parse(*answer)
            except RetryableApiError as error:
                self.stats.count(error.kind)
                if error.is_server_failure:
                    self.breaker.failed(probe)
                else:
                    self.breaker.release(probe)
                # A probe counts too: with the circuit open because of this very request, it
                # would otherwise be asked for ever.
                attempts += 1
                if error.kind == "unreachable" and attempts >= _UNREACHABLE_ATTEMPTS:
                    raise ApiUnreachableError(
                        f"{error}, {attempts} times: check API_BASE_URL and that the API is up"
                    ) from None
                if attempts >= self.policy.max_attempts:
                    last = str(error).removeprefix(f"{what}: ")
                    raise PageUnavailableError(
                        f"{what}: {last} (gave up after {attempts} attempts)", kind=error.kind
                    ) from None
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempts, error.retry_after, error.kind))
                continue
            except (ApiAuthError, ApiConfigError) as error:
                self.breaker.release(probe)
                raise type(error)(f"{what}: {error}") from None  # which request, too
            except BaseException:
                self.breaker.release(probe)
                raise
            self.breaker.succeeded(probe)
            return result

    def _backoff(self, attempt: int, retry_after: float | None, kind: str = "") -> float:
        if kind == "unreachable":
            return _UNREACHABLE_PAUSE
        if retry_after is not None:
            return retry_after + random.uniform(0, 0.25)
        # Exponential with full jitter, so concurrent retries spread out.
        return random.uniform(0, min(self.policy.max_backoff, 0.1 * 2**attempt))

    async def _hedged(
        self, path: str, params: dict[str, str | int], gone_if_404: bool = False
    ) -> tuple[bytes, float] | None:
        """One attempt; while it is slow, further copies race it (one per `hedge_after` since
        the last was sent) and the first answer wins, so hung responses cost a fraction of a
        second instead of the whole timeout."""
        # Well above normal latency (which grows under load), but never long.
        typical = 4 * self.stats.percentile(0.95, recent=True)
        hedge_after = min(self.policy.max_hedge_after, max(self.policy.hedge_after, typical))
        last_sent: list[float] = []
        pending = {asyncio.ensure_future(self._attempt(path, params, last_sent, gone_if_404))}
        copies, failure = 1, None
        try:
            while pending:
                waited = time.monotonic() - last_sent[-1] if last_sent else 0.0
                done, pending = await asyncio.wait(
                    pending,
                    timeout=max(0.01, hedge_after - waited),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    error = task.exception()
                    if error is None:
                        return task.result()
                    if not isinstance(error, RetryableApiError):
                        raise error
                    failure = failure or error
                stalled = last_sent and time.monotonic() - last_sent[-1] >= hedge_after
                # Copies in flight are capped, not copies sent: when the copies of a hung request
                # fail (a 5xx, a 429), a fresh one still races it instead of the whole timeout.
                in_flight_room = len(pending) < self.policy.max_copies
                if pending and stalled and in_flight_room and copies < self.policy.max_attempts:
                    copies += 1
                    self.stats.hedged += 1
                    pending.add(
                        asyncio.ensure_future(
                            self._attempt(path, params, last_sent, gone_if_404, hedge=True)
                        )
                    )
            assert failure is not None
            raise failure
        finally:
            for task in pending:
                task.cancel()

    async def _attempt(
        self,
        path: str,
        params: dict[str, str | int],
        sent_at: list[float],
        gone_if_404: bool = False,
        hedge: bool = False,
    ) -> tuple[bytes, float] | None:
        # A hedged copy takes no slot: the slow original holds one, and waiting for another
        # would make the hedge useless exactly when every slot is stuck.
        async with contextlib.nullcontext() if hedge else self._slots:
            await self.rate.wait()
            self.stats.requests += 1
            sent_at.append(time.monotonic())
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._deadline):
                    response = await self._client.get(path, params=params)
            # The transport maps aiohttp's errors to httpx's; any it does not map (a malformed
            # response, say) is a failed attempt all the same.
            except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as error:
                if why := _unreachable(error):
                    url = self._client.base_url
                    raise RetryableApiError(
                        f"cannot reach the API at {url.host}:{url.port or _PORTS[url.scheme]}"
                        f" ({why})",
                        kind="unreachable",
                    ) from None
                cause = error.__cause__ or error  # the transport raises httpx's from aiohttp's
                timed_out = isinstance(cause, TimeoutError | httpx.TimeoutException)
                kind = "timeout" if timed_out else "connection"
                # Only the class name: exception texts may quote URLs, never worth the risk.
                raise RetryableApiError(
                    f"{path}: {kind} error ({type(error).__name__})", kind=kind
                ) from None
            # Answers only: hung or cancelled copies would inflate the hedging delay.
            seconds = time.perf_counter() - started
            self.stats.timed(seconds)
        self.rate.record(rejected=response.status_code == 429)
        if gone_if_404 and response.status_code == 404:
            return None
        return self._check(path, response.status_code, response.headers, response.content), seconds

    def _check(self, path: str, status: int, headers: httpx.Headers, body: bytes) -> bytes:
        if status == 200:
            if "html" in headers.get("content-type", ""):
                raise RetryableApiError(f"{path}: got an HTML page instead of JSON", kind="html")
            return body
        if status in (401, 403):
            self.stats.count("auth")
            raise ApiAuthError(
                f"{path}: HTTP {status} from the API: check API_KEY (the key is not accepted)"
            )
        if status == 400:
            self.stats.count("config")
            raise ApiConfigError(
                f"{path}: HTTP 400 from the API: {_error_text(body, self._redact)} (check the"
                " settings that shape requests, such as CARSYNC_PAGE_SIZE)"
            )
        if status == 429:
            raise RetryableApiError(
                f"{path}: HTTP 429", kind="429", retry_after=_retry_after(headers)
            )
        if status in _SERVER_ERRORS:
            raise RetryableApiError(f"{path}: HTTP {status}", kind="5xx")
        self.stats.count(str(status))
        raise ApiError(f"{path}: unexpected HTTP {status} from the API")


_PORTS = {"http": 80, "https": 443}


def _unreachable(error: BaseException) -> str | None:
    """Why no connection could be made at all (refused, unknown host), or None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "host name not found"
        seen = seen.__cause__ or seen.__context__
    return None


def _parse_car(body: bytes, seconds: float) -> Any:
    try:
        return parse_json(body)
    except ValueError:
        raise RetryableApiError("car: body is not complete JSON", kind="truncated") from None


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return max(0.0, float(headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _error_text(body: bytes, redact: Redactor) -> str:
    """What an error answer says, for a message that is logged and stored: one line, the key
    taken out (a server may echo the request, headers and all) before it is cut to length, so
    no piece of the key is left at the cut."""
    try:
        text = str(parse_json(body).get("error", ""))
    except (ValueError, AttributeError):
        text = body.decode(errors="replace")
    return redact(one_line(text))[:_ERROR_TEXT_LIMIT]
