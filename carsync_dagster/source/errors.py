"""Error classes of the source API: each says whether retrying can help."""

from __future__ import annotations


class ApiError(Exception):
    """The API could not give us what we asked for; the message is one safe line."""


class ApiAuthError(ApiError):
    """401/403: the key is wrong. Never retried."""


class ApiConfigError(ApiError):
    """400: our request is wrong (a setting). Never retried."""


class ApiUnreachableError(ApiError):
    """Connection refused or host name not found, a few times within seconds: the API is not
    there (a wrong API_BASE_URL, or the server is down). Not worth the long retries of a slow
    or failing server; the whole sync stops, and a later one starts where it left off."""


class RetryableApiError(ApiError):
    """A fault that may pass: 429, 5xx, timeouts, resets, cut or HTML bodies.

    `kind` is its class in the metrics: "429", "5xx", "timeout", "connection", "unreachable",
    "truncated", "html" or "bad_body"."""

    def __init__(self, message: str, *, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after

    @property
    def is_server_failure(self) -> bool:
        """A server in trouble answers 5xx, times out or drops connections: those trip the
        circuit breaker. A 429 is the server pacing us, a broken body is one page's content
        (the same few pages failing again would keep the circuit open), and a refused
        connection is no server at all."""
        return self.kind in ("5xx", "timeout", "connection")


class PageUnavailableError(ApiError):
    """A request that failed every attempt. Fetching pages, it costs the page's partition, not
    the sync. `permanent` when the answer itself is broken (no data list, not JSON): asking again
    the same way would fail the same way, so the sync that meets it is not resumed."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def permanent(self) -> bool:
        return self.kind in ("bad_body", "truncated")
