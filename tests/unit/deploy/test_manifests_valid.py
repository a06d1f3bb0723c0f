"""Every rendered object against the schema its API server would apply.

- core kinds (and every Ray pod template, as a core PodTemplate) with ``kubernetes-validate``,
  strictly (unknown fields refused), for Kubernetes 1.30 (the chart's oldest target with
  every API it uses) and the newest release it ships;
- RayService/RayJob against KubeRay v1.7.0's CRD schemas, PodMonitor/PrometheusRule against
  prometheus-operator's, with unknown fields refused too (``kubectl apply`` validates fields
  strictly by default since Kubernetes 1.27, so a typo would be an error there as well);
- what KubeRay's operator checks itself before it creates anything (a port of
  ``ray-operator/controllers/ray/utils/validation.go``, the rules this chart can break), and
  the name limits it imposes.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"RayService", "RayJob", "PodMonitor", "PrometheusRule", "ServiceMonitor"}
RENDERS = ("default", "ci", "deploy")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAY_NAME = 47  # KubeRay: MaxRayClusterNameLength (53) - 6 for the cluster name suffix


def _core_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] not in CRD_KINDS]


def _pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, template) of every Ray pod template in RayServices and RayJobs."""
    found = []
    for obj in objects:
        spec = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}.get(obj["kind"])
        if spec is None:
            continue
        cluster = obj["spec"][spec]
        found.append((f"{obj['kind']} head", cluster["headGroupSpec"]["template"]))
        for group in cluster.get("workerGroupSpecs", []):
            found.append((f"{obj['kind']} {group['groupName']}", group["template"]))
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", RENDERS)
def test_core_objects_are_valid(renders: dict[str, Any], values: str, version: str) -> None:
    objects = _core_objects(renders[values])
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", RENDERS)
def test_ray_pod_templates_are_valid_pod_templates(
    renders: dict[str, Any], values: str, version: str
) -> None:
    templates = _pod_templates(renders[values])
    assert len(templates) >= 3  # head, CPU and GPU workers
    for where, template in templates:
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            kubernetes_validate.validate(wrapper, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{values} {where}: {exc}") from exc


def test_core_validation_would_catch_a_typo(renders: dict[str, Any]) -> None:
    policy = copy.deepcopy(next(o for o in renders["default"] if o["kind"] == "NetworkPolicy"))
    policy["spec"]["policyType"] = ["Ingress"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, KUBERNETES_VERSIONS[0], strict=True)


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict field validation."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_errors(obj: dict[str, Any], crd_schemas: dict[tuple[str, str, str], Any]) -> list[str]:
    group, version = obj["apiVersion"].split("/")
    schema = crd_schemas[(group, version, obj["kind"])]
    validator = jsonschema.Draft7Validator(strict(schema))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("values", RENDERS)
def test_custom_resources_match_their_crds(
    renders: dict[str, Any], crd_schemas: dict[tuple[str, str, str], Any], values: str
) -> None:
    objects = [o for o in renders[values] if o["kind"] in CRD_KINDS]
    assert {o["kind"] for o in objects} >= {"RayService", "PodMonitor", "PrometheusRule"}
    for obj in objects:
        assert _crd_errors(obj, crd_schemas) == [], obj["kind"]


def test_crd_validation_would_catch_a_typo(
    renders: dict[str, Any], crd_schemas: dict[tuple[str, str, str], Any]
) -> None:
    service = copy.deepcopy(next(o for o in renders["ci"] if o["kind"] == "RayService"))
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    service["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["stepSizePercent"] = "25"
    errors = _crd_errors(service, crd_schemas)
    assert any("rayStartParam" in e for e in errors)
    assert any("stepSizePercent" in e for e in errors)


# --- KubeRay's own checks (validation.go: ValidateRayClusterSpec, ValidateRayServiceSpec,
# ValidateRayJobSpec), for the fields this chart sets -------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def kuberay_cluster_errors(spec: dict[str, Any]) -> list[str]:
    errors = []
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = autoscaling and spec.get("autoscalerOptions", {}).get("version") == "v2"
    for name, group in groups:
        pod = group["template"]["spec"]
        if not pod.get("containers"):
            errors.append(f"{name}: no container")
        params = group.get("rayStartParams", {})
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            errors.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels']")
        if v2 and pod.get("restartPolicy") not in (None, "", "Never"):
            errors.append(f"{name}: restartPolicy must be Never with autoscaler v2")
        if autoscaling and group.get("suspend"):
            errors.append(f"{name}: suspended with autoscaling")
    head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    if "RAY_enable_autoscaler_v2" in head_env and (
        not autoscaling or "version" in spec.get("autoscalerOptions", {})
    ):
        errors.append("RAY_enable_autoscaler_v2 set beside autoscalerOptions.version or without autoscaling")
    if spec.get("authOptions", {}).get("mode") == "token" and _version(spec["rayVersion"]) < (2, 52, 0):
        errors.append("token auth needs rayVersion >= 2.52.0")
    if spec.get("gcsFaultToleranceOptions") and "redis-password" in spec["headGroupSpec"].get(
        "rayStartParams", {}
    ):
        errors.append("redis-password in rayStartParams with gcsFaultToleranceOptions")
    return errors


def kuberay_service_errors(service: dict[str, Any]) -> list[str]:
    spec = service["spec"]
    errors = kuberay_cluster_errors(spec["rayClusterConfig"])
    strategy = spec.get("upgradeStrategy", {})
    kind = strategy.get("type")
    if kind not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
        errors.append(f"upgradeStrategy.type {kind}")
    if kind == "NewClusterWithIncrementalUpgrade":
        options = strategy.get("clusterUpgradeOptions") or {}
        if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
            errors.append("incremental upgrade without the autoscaler")
        if not 0 <= options.get("maxSurgePercent", 100) <= 100:
            errors.append("maxSurgePercent")
        if not 0 <= options.get("stepSizePercent", -1) <= 100:
            errors.append("stepSizePercent")
        if options.get("intervalSeconds", 0) <= 0:
            errors.append("intervalSeconds")
        if not options.get("gatewayClassName"):
            errors.append("gatewayClassName")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("rayClusterDeletionDelaySeconds")
    if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
        errors.append("headService name set")
    return errors


def kuberay_job_errors(job: dict[str, Any]) -> list[str]:
    import yaml

    spec = job["spec"]
    errors = kuberay_cluster_errors(spec["rayClusterSpec"])
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("ttlSecondsAfterFinished < 0")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    if spec.get("suspend") and not shutdown:
        errors.append("suspend without shutdownAfterJobFinishes")
    if spec.get("submissionMode") == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            errors.append("SidecarMode with a submitter pod")
        if spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy") not in (
            None,
            "Never",
        ):
            errors.append("SidecarMode needs head restartPolicy Never")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        errors.append("activeDeadlineSeconds <= 0")
    if spec.get("backoffLimit", 0) < 0:
        errors.append("backoffLimit < 0")
    yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    return errors


@pytest.mark.parametrize("values", RENDERS)
def test_kuberay_would_accept_the_resources(renders: dict[str, Any], values: str) -> None:
    for obj in renders[values]:
        if obj["kind"] in ("RayService", "RayJob"):
            name = obj["metadata"]["name"]
            assert DNS_1035.match(name), name
            assert len(name) <= MAX_RAY_NAME, name
        if obj["kind"] == "RayService":
            assert kuberay_service_errors(obj) == []
        if obj["kind"] == "RayJob":
            assert kuberay_job_errors(obj) == []


def test_kuberay_checks_catch_what_they_should(renders: dict[str, Any]) -> None:
    service = copy.deepcopy(next(o for o in renders["ci"] if o["kind"] == "RayService"))
    cluster = service["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"] = "Always"
    cluster["rayVersion"] = "2.51.0"
    del service["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"]
    assert len(kuberay_service_errors(service)) == 3


def test_long_release_names_stay_within_kuberays_limit(render: Any) -> None:
    objects = render(
        sets=(
            "fullnameOverride=" + "r" * 41,
            "batch.enabled=true",
            "batch.job.input=/in",
            "batch.job.output=/out",
        )
    )
    names = [o["metadata"]["name"] for o in objects if o["kind"] in ("RayService", "RayJob")]
    assert len(names) == 2
    assert all(len(n) <= MAX_RAY_NAME for n in names)
