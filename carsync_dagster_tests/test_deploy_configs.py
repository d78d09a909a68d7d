"""The shipped deployment configs validate against Dagster's own config schemas (no services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster_celery.executor import CELERY_CONFIG
from dagster_k8s import K8sRunLauncher

ROOT = Path(__file__).resolve().parents[1]
K8S_LAUNCHER_CONFIG = K8sRunLauncher.config_type()  # type: ignore[no-untyped-call]


def _load(path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / path).read_text())
    return loaded


@pytest.mark.parametrize(
    "path",
    [
        "carsync_dagster/dagster.yaml",
        "deploy/kubernetes/dagster.yaml",
        "deploy/celery/dagster.yaml",
    ],
)
def test_instance_configs_are_valid(path: str) -> None:
    result = validate_config(dagster_instance_config_schema(), _load(path))
    assert result.success, result.errors


def test_the_kubernetes_run_launcher_config_is_valid() -> None:
    launcher = _load("deploy/kubernetes/dagster.yaml")["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = validate_config(K8S_LAUNCHER_CONFIG, launcher["config"])
    assert result.success, result.errors


def test_the_celery_executor_run_config_is_valid() -> None:
    execution = _load("deploy/celery/run_config.yaml")["execution"]["config"]
    result = validate_config(CELERY_CONFIG, execution)
    assert result.success, result.errors


def test_no_secret_is_written_in_a_deploy_file() -> None:
    for path in ROOT.glob("deploy/**/*.yaml"):
        text = path.read_text()
        assert "postgresql://" not in text and "API_KEY=" not in text, path


def test_the_validation_catches_a_wrong_key() -> None:
    config = dict(_load("deploy/kubernetes/dagster.yaml")["run_launcher"]["config"])
    config["job_namespce"] = config.pop("job_namespace")
    assert not validate_config(K8S_LAUNCHER_CONFIG, config).success
