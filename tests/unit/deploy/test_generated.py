"""Generated files are up to date: deploy/k8s is a fresh render of the chart with its values
file, and values.schema.json carries the current ServeConfig/BatchConfig schemas.
Regenerate with `python tools/chart.py sync`."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from raytseg.batch.config import BatchConfig
from raytseg.serve.config import ServeConfig


def test_deploy_manifests_equal_a_fresh_render(chart: Any) -> None:
    for path, text in chart.deploy_manifests().items():
        assert path.exists(), f"{path} missing: run python tools/chart.py sync"
        assert path.read_text() == text, f"{path.name} is stale: run python tools/chart.py sync"


def test_deploy_manifests_hold_the_service_and_the_batch_job(chart: Any) -> None:
    import yaml

    def kinds(name: str) -> list[str]:
        return [d["kind"] for d in yaml.safe_load_all((chart.DEPLOY / name).read_text()) if d]

    assert "RayService" in kinds("raytseg.yaml")
    assert "RayJob" not in kinds("raytseg.yaml")
    assert kinds("batch-job.yaml") == ["ConfigMap", "RayJob"]
    # helm test hooks are not plain manifests.
    assert "Pod" not in kinds("raytseg.yaml")


def test_schema_definitions_are_generated_from_the_models(chart: Any) -> None:
    current = json.loads(chart.SCHEMA.read_text())
    assert current == chart.schema_with_generated(current), "run python tools/chart.py sync"
    assert chart.SCHEMA.read_text() == chart.schema_text(current)


def test_check_command_passes(chart: Any) -> None:
    assert chart.main(["check"]) == 0


DEVICES = ["cpu", "gpu", "gpu:0", "gpu:12", "GPU", "gpu:", "mps", "cuda", "gpu:x", "tpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_the_schema_device_pattern_agrees_with_both_configs(chart: Any, device: str) -> None:
    definitions = json.loads(chart.SCHEMA.read_text())["definitions"]
    for model, data in [
        (ServeConfig, {"device": device, "models": {"num_gpus": 0}, "pool": {"num_gpus": 0}}),
        (BatchConfig, {"input": "/i", "output": "/o", "device": device}),
    ]:
        pattern = definitions[model.__name__]["properties"]["device"]["pattern"]
        assert bool(re.search(pattern, device)) == _accepts(model, data), (model.__name__, device)


def _accepts(model: Any, data: dict[str, Any]) -> bool:
    try:
        model.model_validate(data)
    except ValidationError:
        return False
    return True
