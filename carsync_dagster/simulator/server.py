"""The simulator's HTTP server: a plain ASGI app over the car store, served by uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import math
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson

from .data import Store, dumps, mix
from .faults import Faults, Stats, TokenBucket

KEY_ENV = "CARSYNC_SIMULATOR_KEY"
DEFAULT_KEY = "carsync-simulator-key"
JSON_TYPE = b"application/json"
HTML_TYPE = b"text/html; charset=utf-8"
MAINTENANCE_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Down for maintenance</title></head>"
    b"<body><h1>We&rsquo;ll be back soon</h1><p>Scheduled maintenance in progress.</p>"
    b"</body></html>\n"
)
ERROR_STATUSES = (500, 502, 503, 504)
CONTROL_POSTS = ("/_sim/mutate", "/_sim/undelete", "/_sim/fix", "/_sim/config", "/_sim/break")
# How /_sim/break serves a list page, every time it is asked for, until it is mended (echo_400
# also when asked with updated_since, the others only without).
BREAKAGES = {
    "no_data": "a body without a data list",
    "not_json": "a body that is not JSON",
    "bad_utf8": "a record with bytes that are not UTF-8 (the page itself is fine)",
    "echo_400": "a 400 whose error text echoes the request's key: as sent, URL-quoted, base64",
}
CLIENT_GONE = 499  # recorded in the stats for a hang the client gave up on

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ListQuery = tuple[int, int, int | None, str | None]


async def send_body(
    send: Send, status: int, body: bytes, content_type: bytes = JSON_TYPE, retry_after: int = 0
) -> int:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


async def send_json(send: Send, status: int, payload: Any, retry_after: int = 0) -> int:
    return await send_body(send, status, orjson.dumps(payload), retry_after=retry_after)


async def send_truncated(send: Send, body: bytes) -> int:
    # No content-length: uvicorn sends it chunked and ends it properly, so only the JSON is cut.
    headers = [(b"content-type", JSON_TYPE)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    return 200


async def send_stream(send: Send, chunks: Iterator[bytes]) -> None:
    headers = [(b"content-type", JSON_TYPE)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(0)  # let API requests through between pieces
    await send({"type": "http.response.body", "body": b""})


async def hang(receive: Receive, seconds: float) -> bool:
    """Sleep `seconds`; False as soon as the client disconnects (nothing left to answer)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), seconds)
    except TimeoutError:
        return True
    return False


async def read_json(receive: Receive) -> dict[str, Any]:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    raw = b"".join(chunks)
    payload = orjson.loads(raw) if raw.strip() else {}
    if not isinstance(payload, dict):
        raise ValueError("the body must be a JSON object")
    return payload


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int | None) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    text = raw.strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{name} must be an integer, got {raw!r}")
    value = int(text)
    if value < lo or (hi is not None and value > hi):
        limit = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {limit}, got {value}")
    return value


def parse_list_query(query_string: bytes) -> ListQuery:
    """(page, per_page, updated_since as whole epoch seconds, manufacturer); ValueError if bad."""
    params = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    page = _int_param(params, "page", 1, 1, None)
    per_page = _int_param(params, "per_page", 100, 1, 1000)
    since = None
    raw = params.get("updated_since")
    if raw is not None:
        try:
            moment = datetime.fromisoformat(raw.strip().upper())
        except ValueError:
            raise ValueError(f"updated_since is not an RFC 3339 timestamp: {raw!r}") from None
        if moment.tzinfo is None:
            raise ValueError(f"updated_since needs a UTC offset or Z: {raw!r}")
        since = math.floor(moment.timestamp())  # "later than" holds the same for whole seconds
    maker = params.get("manufacturer", "").strip() or None
    return page, per_page, since, maker


def _echo(scope: Message) -> str:
    """What a careless server answers a request it refuses: the request, key and all, in the
    spellings such servers use (as sent, as a URL parameter, in a base64 dump of the header)."""
    key = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"").decode("latin-1")
    query = scope["query_string"].decode("latin-1")
    dump = base64.b64encode(f"X-API-Key: {key}".encode("latin-1")).decode()
    return (
        f"refused {scope['path']}?{query} with X-API-Key {key} "
        f"(api_key={quote(key, safe='')}, header dump {dump})"
    )


class SimulatorApp:
    """ASGI app: the source API on /cars, control endpoints on /_sim/."""

    def __init__(self, store: Store, faults: Faults, api_key: str) -> None:
        self.store = store
        self.faults = faults
        self.key = api_key.encode()
        self.stats = Stats()
        self.rng = random.Random(faults.fault_seed)
        self.bucket = self._bucket()
        self.broken_pages: dict[int, str] = {}  # list page number → one of BREAKAGES

    def _bucket(self) -> TokenBucket | None:
        f = self.faults
        return TokenBucket(f.rate_limit, f.burst) if f.rate_limit > 0 else None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        api = path == "/cars" or path.startswith("/cars/")
        key = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"")
        if not hmac.compare_digest(key, self.key):
            status = await send_json(send, 401, {"error": "missing or wrong X-API-Key"})
            if api:
                self.stats.requests += 1
                self.stats.by_status[status] += 1
        elif api:
            await self._api(scope, receive, send)
        elif path.startswith("/_sim/"):
            await self._control(scope, receive, send)
        else:
            await send_json(send, 404, {"error": f"no such endpoint: {path}"})

    # ---- the source API -----------------------------------------------------------------

    async def _api(self, scope: Message, receive: Receive, send: Send) -> None:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            status = await self._serve(scope, receive, send)
        finally:
            stats.in_flight -= 1
        stats.by_status[status] += 1

    async def _serve(self, scope: Message, receive: Receive, send: Send) -> int:
        if scope["method"] != "GET":
            return await send_json(send, 405, {"error": "only GET is allowed"})
        path: str = scope["path"]
        query = None
        if path == "/cars":
            try:
                query = parse_list_query(scope["query_string"])
            except ValueError as exc:
                return await send_json(send, 400, {"error": str(exc)})

        f, rng = self.faults, self.rng
        if f.latency_ms:
            await asyncio.sleep(f.latency_ms / 1000 * (0.5 + rng.random()))
        if self.bucket is not None and (wait := self.bucket.take()):
            return await send_json(send, 429, {"error": "rate limit exceeded"}, retry_after=wait)
        if f.overload_429 and rng.random() < f.overload_429:
            return await send_json(send, 429, {"error": "server overloaded"}, retry_after=1)
        self._admitted()
        if f.error_rate and rng.random() < f.error_rate:
            status = rng.choice(ERROR_STATUSES)
            return await send_json(send, status, {"error": f"simulated failure {status}"})
        if f.hang_rate and rng.random() < f.hang_rate and not await hang(receive, f.hang_seconds):
            return CLIENT_GONE
        if f.html_rate and rng.random() < f.html_rate:
            return await send_body(send, 200, MAINTENANCE_PAGE, HTML_TYPE)
        truncate = bool(f.truncate_rate) and rng.random() < f.truncate_rate

        if query is not None and self.broken_pages.get(query[0]) == "echo_400":
            return await send_json(send, 400, {"error": _echo(scope)})  # with updated_since too
        if query is None:
            self.stats.by_id += 1
            found, record = self.store.get(path[len("/cars/") :])
            if not found:
                return await send_json(send, 404, {"error": "no such listing"})
            body = dumps(record)
        else:
            body = self._page(*query)
        if truncate:
            return await send_truncated(send, body)
        await send_body(send, 200, body)
        if query is not None:
            if query[2] is None:
                self.stats.list_pages[query[0]] += 1
            else:
                self.stats.since_pages += 1
        return 200

    def _admitted(self) -> None:
        admitted = self.stats.admitted
        admitted[int(time.time())] += 1
        if len(admitted) > 3600:  # a long-running server keeps the last hour
            del admitted[next(iter(admitted))]

    def _page(self, page: int, per_page: int, since: int | None, maker: str | None) -> bytes:
        f = self.faults
        if since is None and (f.drift_inserts or f.drift_deletes):
            self.store.drift(f.drift_inserts, f.drift_deletes)
        data, total = self.store.page(page, per_page, since, maker)
        meta = {
            "current_page": page,
            "per_page": per_page,
            "last_page": max(1, -(-total // per_page)),
            "total": total,
        }
        broken = self.broken_pages.get(page) if since is None else None
        if broken == "no_data":
            return orjson.dumps({"meta": meta})
        if broken == "not_json":
            return b'{"data": [{"id": '
        body = dumps({"data": data, "meta": meta})
        if broken == "bad_utf8" and data:
            # The first record's first string value gets a byte that no UTF-8 text holds.
            start = body.index(b'":"', body.index(b'"data":[{')) + 3
            body = body[:start] + b"\xff\xfe" + body[start:]
        return body

    # ---- control endpoints --------------------------------------------------------------

    async def _control(self, scope: Message, receive: Receive, send: Send) -> None:
        route = (scope["method"], scope["path"])
        store = self.store
        try:
            if route == ("GET", "/_sim/truth"):
                await send_stream(send, store.truth_json())
                return
            if route == ("GET", "/_sim/stats"):
                result: Any = self.stats.as_dict()
            elif route == ("POST", "/_sim/stats/reset"):
                self.stats.reset()
                result = self.stats.as_dict()
            elif route == ("GET", "/_sim/config"):
                result = self.faults.as_dict()
            elif route[0] != "POST" or route[1] not in CONTROL_POSTS:
                await send_json(send, 404, {"error": f"no such endpoint: {' '.join(route)}"})
                return
            else:
                result = self._control_post(route[1], await read_json(receive))
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            await send_json(send, 400, {"error": str(exc)})
            return
        await send_json(send, 200, result)

    def _control_post(self, path: str, body: dict[str, Any]) -> Any:
        if path == "/_sim/mutate":
            counts = {k: body.get(k, 0) for k in ("update", "insert", "delete")}
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts.values()):
                raise ValueError("update, insert and delete must be integers >= 0")
            seed = body.get("seed")
            if seed is not None and not isinstance(seed, int):
                raise ValueError("seed must be an integer")
            return self.store.mutate(**counts, seed=seed)
        if path == "/_sim/undelete":
            ids = body.get("ids")
            if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
                raise ValueError("ids must be a list of strings")
            return {"undeleted": self.store.undelete(ids)}
        if path == "/_sim/fix":
            count, ids, seed = body.get("count", 0), body.get("ids"), body.get("seed")
            ids = [] if ids is None else ids
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError("count must be an integer >= 0")
            if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
                raise ValueError("ids must be a list of strings")
            if seed is not None and not isinstance(seed, int):
                raise ValueError("seed must be an integer")
            return {"fixed": self.store.fix(count, ids, seed)}
        if path == "/_sim/break":
            pages = body.get("pages")
            if not isinstance(pages, dict) or not all(
                str(page).isdigit() and how in (*BREAKAGES, "mend") for page, how in pages.items()
            ):
                raise ValueError(f"pages must map page numbers to one of {[*BREAKAGES, 'mend']}")
            for page, how in pages.items():
                if how == "mend":
                    self.broken_pages.pop(int(page), None)
                else:
                    self.broken_pages[int(page)] = how
            return {"broken_pages": {str(k): v for k, v in sorted(self.broken_pages.items())}}
        self.faults.update(body)  # /_sim/config
        if "fault_seed" in body:
            self.rng = random.Random(self.faults.fault_seed)
        if {"rate_limit", "burst"} & body.keys():
            self.bucket = self._bucket()
        return self.faults.as_dict()


# ---- command line -----------------------------------------------------------------------


def _number(
    kind: type[int] | type[float], lo: float, hi: float | None = None
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < lo or (hi is not None and value > hi):
            limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{text}: must be {limit}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    fraction = _number(float, 0, 1)
    count = _number(int, 0)
    p = argparse.ArgumentParser(
        prog="carsync simulate",
        description="Serve a simulated used-car listings API (key from $CARSYNC_SIMULATOR_KEY).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000, help="0 = a free port")
    p.add_argument("--cars", type=count, default=200_000, help="listings at start")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--broken-rate", type=fraction, default=0.005, help="share of broken records")
    p.add_argument(
        "--pathological", type=count, default=0,
        help="listings served with a pathological value (5 MB string, 500-deep nesting, NUL,"
        " an item that is not an object, integers past 64 bits), each kind in turn",
    )  # fmt: skip
    p.add_argument("--rate-limit", type=_number(float, 0), default=0.0, help="requests/s, 0 = off")
    p.add_argument("--burst", type=_number(int, 1), default=10, help="token bucket size")
    p.add_argument("--overload-429", type=fraction, default=0.0, help="share answered 429")
    p.add_argument("--error-rate", type=fraction, default=0.0, help="share answered 5xx")
    p.add_argument("--hang-rate", type=fraction, default=0.0, help="share answered late")
    p.add_argument("--hang-seconds", type=_number(float, 0), default=30.0)
    p.add_argument("--truncate-rate", type=fraction, default=0.0, help="share cut short")
    p.add_argument("--html-rate", type=fraction, default=0.0, help="share answered with HTML")
    p.add_argument("--latency-ms", type=_number(float, 0), default=0.0, help="added delay")
    p.add_argument("--drift-inserts", type=count, default=0, help="new listings per list call")
    p.add_argument("--drift-deletes", type=count, default=0, help="deleted per list call")
    p.add_argument("--fault-seed", type=int, default=None, help="default: derived from --seed")
    # Used by process.start_simulator: exit when the parent's end of stdin closes.
    p.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    return p


def _watch_stdin(stop: Callable[[], None]) -> None:
    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        stop()
        time.sleep(5)  # a graceful stop normally ends the process long before this
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-stdin", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error, already printed
        return exc.code if isinstance(exc.code, int) else 2
    import uvicorn  # here, so that importing this module stays cheap

    faults = Faults(
        **{f.name: getattr(args, f.name) for f in fields(Faults) if f.name != "fault_seed"}
    )
    faults.fault_seed = (
        args.fault_seed if args.fault_seed is not None else mix(args.seed ^ 0xFA) % 2**31
    )
    store = Store(args.cars, args.seed, args.broken_rate, args.pathological)
    app = SimulatorApp(store, faults, os.environ.get(KEY_ENV, DEFAULT_KEY))

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(
            f"carsync simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 1
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"

    config = uvicorn.Config(
        app,
        lifespan="off",
        ws="none",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=1,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    if args.exit_with_stdin:
        _watch_stdin(lambda: setattr(server, "should_exit", True))

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.005)
        if server.started:
            print(f"carsync simulator listening on {url}", flush=True)
        await task

    try:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(serve())
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful stop
        pass
    return 0 if server.started else 1
