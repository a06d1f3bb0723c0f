"""helm lint and helm template with a real helm: what renders, and what the chart refuses."""

from __future__ import annotations

from collections import Counter
from types import ModuleType
from typing import Any

import pytest


@pytest.mark.parametrize("values", ["default", "ci", "deploy"])
def test_lint_is_clean(chart: ModuleType, values: str) -> None:
    files = {"default": [], "ci": [chart.CI_VALUES], "deploy": [chart.DEPLOY_VALUES]}[values]
    args = ["lint", "--strict", str(chart.CHART)]
    for path in files:
        args += ["-f", str(path)]
    out = chart.helm(*args)
    assert "0 chart(s) failed" in out
    # Only the informational note about a missing icon.
    assert [line for line in out.splitlines() if line.startswith("[")] == [
        "[INFO] Chart.yaml: icon is recommended"
    ]


def test_default_render(renders: dict[str, list[dict[str, Any]]]) -> None:
    kinds = Counter(o["kind"] for o in renders["default"])
    assert kinds == {
        "RayService": 1,
        "ServiceAccount": 1,
        "NetworkPolicy": 1,
        "PodMonitor": 2,
        "PrometheusRule": 1,
        "ConfigMap": 1,  # the dashboard
        "Pod": 1,  # helm test
    }


@pytest.mark.parametrize("values", ["ci", "deploy"])
def test_full_render(renders: dict[str, list[dict[str, Any]]], values: str) -> None:
    kinds = Counter(o["kind"] for o in renders[values])
    assert kinds == {
        "RayService": 1,
        "RayJob": 1,
        "ServiceAccount": 1,
        "NetworkPolicy": 1,
        "Ingress": 1,
        "PodMonitor": 2,
        "PrometheusRule": 1,
        "ConfigMap": 2,  # the dashboard, the batch job's config
        "Pod": 1,
    }


# --set assignments values.schema.json must refuse, and a part of helm's message.
WRONG_VALUES = [
    ("serve.devic=cpu", "Additional property devic is not allowed"),
    ("serve.device=tpu", "serve.device: Does not match pattern"),
    ("serve.tasks.no_such_task.modes[0]=fast", 'Property name of "no_such_task" does not match'),
    ("serve.tasks.total.modes[0]=quick", "serve.tasks.total.modes.0"),
    ("serve.models.num_gpus=2", "serve.models.num_gpus: Must be less than or equal to 1"),
    ("serve.limits.overload_status=500", "serve.limits.overload_status"),
    ("serve.request_timeout_s=-5", "serve.request_timeout_s"),
    ("gpuWorkers.gpusPerPod=0", "gpuWorkers.gpusPerPod: Must be greater than or equal to 1"),
    ("gpuWorkers.replicas=two", "gpuWorkers.replicas: Invalid type"),
    ("head.rayStartParams.num-gpus=1", "head.rayStartParams.num-gpus: Invalid type. Expected: string"),
    ("rayService.upgradeStrategy.type=BlueGreen", "rayService.upgradeStrategy.type must be one of"),
    ("rayService.upgradeStrategy.type=NewClusterWithIncrementalUpgrade", "gatewayClassName is required"),
    ("rayService.deployments[0].name=Frontend", "rayService.deployments.0.name: Does not match pattern"),
    ("rayVersion=2.60", "rayVersion: Does not match pattern"),
    ("rayAuth.mode=password", "rayAuth.mode must be one of"),
    ("autoscaling.version=v3", "autoscaling.version must be one of"),
    ("monitoring.podMonitors.interval=often", "monitoring.podMonitors.interval: Does not match pattern"),
    ("monitoring.prometheusRule.alerts.errorRatio.threshold=5", "errorRatio.threshold"),
    ("batch.submissionMode=Cron", "batch.submissionMode must be one of"),
    ("batch.job.task=everything", "batch.job.task must be one of"),
    ("batch.job.model.concurrency[0]=x", "batch.job.model.concurrency.0: Invalid type"),
    ("batch.job.no_such_option=true", "Additional property no_such_option is not allowed"),
    ("ingress.host=Not_A_Host", "ingress.host: Does not match pattern"),
    ("fullnameOverride=Raytseg", "fullnameOverride: Does not match pattern"),
    ("unknownTopLevel=1", "Additional property unknownTopLevel is not allowed"),
]


@pytest.mark.parametrize(("assignment", "message"), WRONG_VALUES)
def test_schema_refuses_wrong_values(chart: ModuleType, assignment: str, message: str) -> None:
    with pytest.raises(chart.HelmError) as refused:
        chart.template(sets=[assignment])
    assert "values don't meet the specifications of the schema" in str(refused.value)
    assert message in str(refused.value)


# Combinations the schema cannot see; the templates fail with what to change.
CONTRADICTIONS = [
    (["gpuWorkers.enabled=false"], "serve asks for GPU shares"),
    (["cpuWorkers.enabled=false", "gpuWorkers.enabled=false"], "both disabled"),
    (["batch.enabled=true"], "batch.job.input is required"),
    (["batch.enabled=true", "batch.job.input=s3://b/in/"], "batch.job.output is required"),
    (["apiAuth.existingSecret="], "serve.auth.required is true but no tokens are configured"),
    (
        [
            "autoscaling.enabled=false",
            "rayService.upgradeStrategy.type=NewClusterWithIncrementalUpgrade",
            "rayService.upgradeStrategy.clusterUpgradeOptions.gatewayClassName=istio",
            "rayService.upgradeStrategy.clusterUpgradeOptions.stepSizePercent=10",
            "rayService.upgradeStrategy.clusterUpgradeOptions.intervalSeconds=30",
        ],
        "needs autoscaling.enabled",
    ),
    (["head.gcsFaultTolerance.enabled=true"], "redisAddress is required"),
    (["dicomweb.existingSecret=pacs", "dicomweb.userKey=user"], "names no credentials"),
    (["dicomweb.tokenKey=token"], "dicomweb.existingSecret is empty"),
    (["serve.ingress.num_cpus=1"], "the ingress could never be placed"),
]


@pytest.mark.parametrize(("sets", "message"), CONTRADICTIONS)
def test_templates_refuse_contradictions(chart: ModuleType, sets: list[str], message: str) -> None:
    with pytest.raises(chart.HelmError, match="execution error") as refused:
        chart.template(sets=sets)
    assert message in str(refused.value)


def test_cpu_only_service_needs_no_gpu_group(render: Any, find_one: Any) -> None:
    objects = render(
        sets=(
            "gpuWorkers.enabled=false",
            "serve.device=cpu",
            "serve.models.num_gpus=0",
            "serve.pool.num_gpus=0",
        )
    )
    groups = find_one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu"]
