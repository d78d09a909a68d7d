"""Error classes of the source API: each says whether retrying can help."""

from __future__ import annotations


class ApiError(Exception):
    """The API could not give us what we asked for; the message is one safe line."""


class ApiAuthError(ApiError):
    """401/403: the key is wrong. Never retried."""


class ApiConfigError(ApiError):
    """400: our request is wrong (a setting). Never retried."""


class RetryableApiError(ApiError):
    """A fault that may pass: 429, 5xx, timeouts, resets, cut or HTML bodies."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
