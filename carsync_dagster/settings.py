"""Settings from the environment (operations.md), validated before any I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

# redact lives with the rest of redaction; it stays importable from here.
from carsync_dagster.redaction import redact as redact
from carsync_dagster.source.client import RetryPolicy

_SECRET_SETTINGS = ("API_KEY", "DATABASE_URL")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Listings per partition: what a crash or a bad page costs at most, at any page size.
DEFAULT_PARTITION_SIZE = 5_000


class SettingsError(ValueError):
    """A bad setting: the message is one line that names it."""


class Settings(BaseModel):
    """Each field is read from its environment name (operations.md)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    api_base_url: str | None = Field(default=None, validation_alias="API_BASE_URL")
    api_key: SecretStr | None = Field(default=None, validation_alias="API_KEY")
    database_url: SecretStr | None = Field(default=None, validation_alias="DATABASE_URL")
    schema_name: str = Field(default="carsync", validation_alias="CARSYNC_SCHEMA")
    dagster_home: str | None = Field(default=None, validation_alias="DAGSTER_HOME")
    page_size: int = Field(default=100, validation_alias="CARSYNC_PAGE_SIZE")
    # Listings per partition; CARSYNC_PAGES_PER_PARTITION (pages of the page size) is the older
    # way to say it. A key names listing positions, so either way it means one thing.
    partition_size: int | None = Field(default=None, validation_alias="CARSYNC_PARTITION_SIZE")
    pages_per_partition: int | None = Field(
        default=None, validation_alias="CARSYNC_PAGES_PER_PARTITION"
    )
    concurrency: int = Field(default=16, validation_alias="CARSYNC_CONCURRENCY")
    rps: float = Field(default=0, validation_alias="CARSYNC_RPS")
    request_timeout: float = Field(default=30.0, validation_alias="CARSYNC_REQUEST_TIMEOUT")
    max_attempts: int = Field(default=8, validation_alias="CARSYNC_MAX_ATTEMPTS")
    breaker_failures: int = Field(default=10, validation_alias="CARSYNC_BREAKER_FAILURES")
    breaker_cooldown: float = Field(default=60.0, validation_alias="CARSYNC_BREAKER_COOLDOWN")
    max_deactivation: float = Field(default=0.05, validation_alias="CARSYNC_MAX_DEACTIVATION")
    watermark_margin: float = Field(default=300.0, validation_alias="CARSYNC_WATERMARK_MARGIN")
    total_tolerance: float = Field(default=0.02, validation_alias="CARSYNC_TOTAL_TOLERANCE")
    max_rejected: float = Field(default=0.05, validation_alias="CARSYNC_MAX_REJECTED")
    full_sync_max_age: float = Field(default=26 * 3600, validation_alias="CARSYNC_FULL_MAX_AGE")
    any_sync_max_age: float = Field(default=1800, validation_alias="CARSYNC_SYNC_MAX_AGE")
    data_dir: str = Field(default=".carsync", validation_alias="CARSYNC_DATA_DIR")
    full_sync_cron: str = Field(default="0 3 * * *", validation_alias="CARSYNC_FULL_SYNC_CRON")
    incremental_sync_cron: str = Field(
        default="*/15 * * * *", validation_alias="CARSYNC_INCREMENTAL_SYNC_CRON"
    )
    sensor_interval: int = Field(default=30, validation_alias="CARSYNC_SENSOR_INTERVAL")
    stale_after: float = Field(default=300.0, validation_alias="CARSYNC_STALE_AFTER")
    # A sync that died or failed on something transient is resumed (its landed partitions kept)
    # within this many seconds of its start, and re-run by the daemon at most this many times.
    resume_max_age: float = Field(default=6 * 3600, validation_alias="CARSYNC_RESUME_MAX_AGE")
    max_recoveries: int = Field(default=3, validation_alias="CARSYNC_MAX_RECOVERIES")

    @field_validator("api_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("schema_name")
    @classmethod
    def _plain_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be a plain lower-case identifier")
        return value

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, value: int) -> int:
        if not 1 <= value <= 1000:
            raise ValueError("must be between 1 and 1000")
        return value

    @field_validator("full_sync_cron", "incremental_sync_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string  # only its cron grammar

        if not is_valid_cron_string(value):
            raise ValueError("must be a cron string such as '0 3 * * *'")
        return value

    @field_validator(
        "partition_size",
        "pages_per_partition",
        "concurrency",
        "max_attempts",
        "breaker_failures",
        "sensor_interval",
    )
    @classmethod
    def _at_least_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("max_deactivation", "total_tolerance", "max_rejected")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("must be a fraction between 0 and 1")
        return value

    @field_validator(
        "rps",
        "watermark_margin",
        "full_sync_max_age",
        "any_sync_max_age",
        "resume_max_age",
        "max_recoveries",
    )
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("request_timeout", "breaker_cooldown", "stale_after")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    @model_validator(mode="after")
    def _key_with_url(self) -> Settings:
        if self.api_base_url and self.api_key is None:
            raise ValueError("required when API_BASE_URL is set")
        return self

    @property
    def listings_per_partition(self) -> int:
        if self.partition_size is not None:
            return self.partition_size
        if self.pages_per_partition is not None:
            return self.pages_per_partition * self.page_size
        return DEFAULT_PARTITION_SIZE

    def check_source(self, *, simulated: bool) -> None:
        """A real database is never filled from the bundled simulator unless asked for."""
        if self.database_url is not None and self.api_base_url is None and not simulated:
            raise SettingsError(
                "API_BASE_URL: required when DATABASE_URL is set (pass --simulator to load the "
                "bundled simulator's invented listings into that database)"
            )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            breaker_failures=self.breaker_failures,
            breaker_cooldown=self.breaker_cooldown,
        )

    def secrets(self) -> list[str]:
        """Values that must never be shown: the key and the database password (as written in
        the URL and decoded: libpq quotes it as written when it cannot decode it)."""
        found = [self.api_key.get_secret_value()] if self.api_key else []
        if self.database_url is not None:
            found += url_passwords(self.database_url.get_secret_value())
        return [value for value in dict.fromkeys(found) if value]

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).absolute()

    @property
    def dagster_home_path(self) -> Path:
        return Path(self.dagster_home or self.data_path / "dagster").absolute()


def url_passwords(url: str) -> list[str]:
    """The passwords a libpq URL holds, in its user info or as `?password=`: as written and
    decoded."""
    try:
        parts = urlsplit(url)
        written = [parts.password] if parts.password else []
    except ValueError:  # not a URL: never a setting (the URL check refuses it)
        return []
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if unquote(name) == "password" and value:
            written.append(value)
    return list(dict.fromkeys(form for value in written for form in (value, unquote(value))))


def load_settings(
    environ: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> Settings:
    """Settings from `environ`; non-None `overrides` (CLI flags, keyed by the same names) win.
    A flag never holds a password: every user of the machine can read a command line."""
    values: dict[str, object] = {k: v for k, v in environ.items() if v != ""}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    flag_url = flags.get("DATABASE_URL")
    if isinstance(flag_url, str) and url_passwords(flag_url):
        raise SettingsError(
            "DATABASE_URL: no password on the command line (every user of this machine can read "
            "it there); set it in the DATABASE_URL environment variable instead"
        )
    values.update(flags)
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        # Errors carry the environment name; the one model-level rule is about API_KEY.
        name = str(first["loc"][0]) if first["loc"] else "API_KEY"
        message = first["msg"].removeprefix("Value error, ")
        shown = "" if name in _SECRET_SETTINGS else f" (got {first.get('input')!r})"
        raise SettingsError(f"{name}: {message}{shown}") from None
