from __future__ import annotations

import base64
from urllib.parse import quote

import pytest

from carsync_dagster.settings import SettingsError, load_settings, redact, url_passwords
from carsync_dagster_tests.secret_scan import scan


def test_defaults_follow_the_operations_contract() -> None:
    settings = load_settings({})
    assert (settings.page_size, settings.concurrency) == (100, 16)
    assert settings.listings_per_partition == 5_000
    assert settings.rps == 0 and settings.schema_name == "carsync"
    assert settings.api_base_url is None and settings.database_url is None
    assert (settings.resume_max_age, settings.max_recoveries) == (6 * 3600, 3)


def test_a_partition_is_a_number_of_listings_however_it_is_said() -> None:
    assert load_settings({"CARSYNC_PARTITION_SIZE": "2000"}).listings_per_partition == 2000
    pages = {"CARSYNC_PAGES_PER_PARTITION": "20", "CARSYNC_PAGE_SIZE": "50"}
    assert load_settings(pages).listings_per_partition == 1000, "pages of the page size"
    both = {**pages, "CARSYNC_PARTITION_SIZE": "3000"}
    assert load_settings(both).listings_per_partition == 3000


def test_a_real_database_is_never_filled_from_the_simulator_unasked() -> None:
    settings = load_settings({"DATABASE_URL": "postgresql://u:hunter2@db/warehouse"})
    with pytest.raises(SettingsError) as error:
        settings.check_source(simulated=False)
    assert str(error.value).startswith("API_BASE_URL: ") and "--simulator" in str(error.value)
    assert "hunter2" not in str(error.value)
    settings.check_source(simulated=True)  # asked for explicitly
    load_settings({}).check_source(simulated=False)  # the embedded database: simulated is fine


def test_flags_override_the_environment() -> None:
    settings = load_settings({"CARSYNC_PAGE_SIZE": "5"}, {"CARSYNC_PAGE_SIZE": 7})
    assert settings.page_size == 7


def test_errors_never_show_secrets() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"DATABASE_URL": "mysql://u:hunter2@h/db"})
    assert "DATABASE_URL" in str(error.value) and "hunter2" not in str(error.value)


def test_redact_hides_key_and_password_in_any_spelling() -> None:
    settings = load_settings(
        {
            "API_BASE_URL": "http://api.example",
            "API_KEY": "k/ey+1",
            "DATABASE_URL": "postgresql://u:p%40ss@h/db",
        }
    )
    text = "key k/ey+1 or k%2Fey%2B1, password p@ss"
    assert redact(text, settings.secrets()) == "key *** or ***, password ***"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CARSYNC_FULL_SYNC_CRON", "every night"),
        ("CARSYNC_INCREMENTAL_SYNC_CRON", "*/15 * *"),
        ("CARSYNC_SENSOR_INTERVAL", "0"),
        ("CARSYNC_MAX_RECOVERIES", "-1"),
        ("CARSYNC_RESUME_MAX_AGE", "-5"),
        ("CARSYNC_PARTITION_SIZE", "0"),
    ],
)
def test_bad_automation_settings_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({name: value})
    assert str(error.value).startswith(f"{name}: ") and repr(value) in str(error.value)


def test_redact_hides_base64_and_lower_case_escapes_and_keeps_the_rest() -> None:
    key = "sk/live+Key=42"
    header = base64.b64encode(f"X-API-Key: {key}".encode()).decode()  # the key mid-stream
    lower_hex = (
        quote(key, safe="").replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d")
    )
    text = f"echo {base64.b64encode(key.encode()).decode()} {header} {lower_hex}"
    redacted = redact(text, [key])
    assert redacted.startswith("echo ***") and redacted.count("***") == 3, redacted
    assert scan({"key": key}, texts={"redacted": redacted}) == []
    assert scan({"key": key}, texts={"as it was": text}) != [], "the scan would see it"
    assert redact("nothing secret here", [key]) == "nothing secret here"


@pytest.mark.parametrize(
    ("url", "passwords"),
    [
        ("postgresql://u@h/db", []),
        ("postgresql://u:p%40ss%2542@h/db", ["p%40ss%2542", "p@ss%42"]),
        ("postgresql://u@h/db?sslmode=require&password=hunter%32", ["hunter%32", "hunter2"]),
    ],
)
def test_a_database_url_names_its_passwords_as_written_and_decoded(
    url: str, passwords: list[str]
) -> None:
    assert url_passwords(url) == passwords
    settings = load_settings({"DATABASE_URL": url})
    assert settings.secrets() == passwords


def test_a_password_is_refused_in_a_flag_but_not_in_the_environment() -> None:
    url = "postgresql://u:hunter2@db/warehouse"
    with pytest.raises(SettingsError) as error:
        load_settings({}, {"DATABASE_URL": url})
    message = str(error.value)
    assert message.startswith("DATABASE_URL: ") and "environment variable" in message
    assert "hunter2" not in message and "\n" not in message
    assert load_settings({"DATABASE_URL": url}).database_url is not None
    assert load_settings({}, {"DATABASE_URL": "postgresql://u@db/warehouse"}).database_url
