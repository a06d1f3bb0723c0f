"""What the rendered chart must contain: the RayService's shape, exposure, secrets, monitoring."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

RENDERS = ("default", "ci", "deploy")


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _cluster(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(objects, "RayService")["spec"]["rayClusterConfig"]
    return spec


def _ray_pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pod specs of every Ray node of every RayService and RayJob."""
    pods = []
    for obj in objects:
        if obj["kind"] in ("RayService", "RayJob"):
            cluster = obj["spec"].get("rayClusterConfig") or obj["spec"].get("rayClusterSpec")
            pods.append(cluster["headGroupSpec"]["template"]["spec"])
            pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return pods


@pytest.mark.parametrize("values", RENDERS)
def test_head_runs_no_replicas_and_exports_metrics(renders: dict[str, Any], values: str) -> None:
    head = _cluster(renders[values])["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)


@pytest.mark.parametrize("values", RENDERS)
def test_worker_groups(renders: dict[str, Any], values: str) -> None:
    cpu, gpu = _cluster(renders[values])["workerGroupSpecs"]
    assert (cpu["groupName"], gpu["groupName"]) == ("cpu", "gpu")
    cpu_container = cpu["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    assert cpu_container["image"].endswith("-cpu")
    gpu_spec = gpu["template"]["spec"]
    gpu_container = gpu_spec["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert gpu_container["image"].endswith("-cuda")
    assert gpu_spec["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_spec["tolerations"]
    for group in (cpu, gpu):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


@pytest.mark.parametrize("values", RENDERS)
def test_autoscaling_upgrade_and_ray_auth(renders: dict[str, Any], values: str) -> None:
    service = _one(renders[values], "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["authOptions"]["mode"] == "token"
    assert service["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")


def test_upgrade_strategy_is_exposed(renders: dict[str, Any]) -> None:
    strategy = _one(renders["ci"], "RayService")["spec"]["upgradeStrategy"]
    assert strategy == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {
            "gatewayClassName": "istio",
            "stepSizePercent": 25,
            "intervalSeconds": 60,
            "maxSurgePercent": 50,
        },
    }


@pytest.mark.parametrize("values", RENDERS)
def test_every_ray_container_has_the_metrics_port(renders: dict[str, Any], values: str) -> None:
    for pod in _ray_pods(renders[values]):
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert ports["metrics"] == 8080


@pytest.mark.parametrize("values", RENDERS)
def test_pods_run_as_non_root(renders: dict[str, Any], values: str) -> None:
    pods = _ray_pods(renders[values]) + [_one(renders[values], "Pod")["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("values", RENDERS)
def test_dashboard_is_never_exposed(renders: dict[str, Any], values: str) -> None:
    """No Service, Ingress or LoadBalancer reaches the dashboard (8265) or Ray's client port."""
    for obj in renders[values]:
        if obj["kind"] == "Service":
            raise AssertionError("the chart renders no Services (KubeRay makes head-svc and serve-svc)")
        if obj["kind"] == "Ingress":
            for rule in obj["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    assert backend["port"]["number"] == 8000
                    assert backend["name"].endswith("-serve-svc")
    policy = _one(renders[values], "NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if 8265 in ports:  # only the operator, which submits the Serve config through it
            assert rule["from"][0]["podSelector"]["matchLabels"] == {
                "app.kubernetes.io/name": "kuberay-operator"
            }


@pytest.mark.parametrize("values", RENDERS)
def test_network_policy_has_no_open_rule(renders: dict[str, Any], values: str) -> None:
    policy = _one(renders[values], "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"


@pytest.mark.parametrize("values", ["ci", "deploy"])
def test_ingress_tls_and_limits_follow_the_app(renders: dict[str, Any], values: str) -> None:
    objects = renders[values]
    ingress = _one(objects, "Ingress")
    (app,) = yaml.safe_load(_one(objects, "RayService")["spec"]["serveConfigV2"])["applications"]
    limits, timeout = app["args"]["limits"], app["args"]["request_timeout_s"]
    annotations = ingress["metadata"]["annotations"]
    body_mib = -(-limits["max_body_bytes"] // 2**20)
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{body_mib}m"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == str(timeout + 60)
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == str(timeout + 60)
    assert annotations["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
    (tls,) = ingress["spec"]["tls"]
    assert tls["hosts"] == [ingress["spec"]["rules"][0]["host"]]
    assert tls["secretName"]
    service_name = _one(objects, "RayService")["metadata"]["name"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{service_name}-serve-svc", "port": {"number": 8000}}


@pytest.mark.parametrize("values", ["ci", "deploy"])
def test_service_account_carries_the_identity_annotation(renders: dict[str, Any], values: str) -> None:
    account = _one(renders[values], "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert account["automountServiceAccountToken"] is False
    for pod in _ray_pods(renders[values]):
        assert pod["serviceAccountName"] == account["metadata"]["name"]


SECRETISH = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL)", re.IGNORECASE)


@pytest.mark.parametrize("values", RENDERS)
def test_secrets_are_referenced_never_inlined(renders: dict[str, Any], values: str) -> None:
    objects = renders[values]
    assert not [o for o in objects if o["kind"] == "Secret"]
    for pod in _ray_pods(objects):
        for container in pod["containers"]:
            for env in container.get("env", []):
                if SECRETISH.search(env["name"]) and not _names_a_mounted_secret(env):
                    assert "valueFrom" in env, f"{env['name']} has a literal value"
    (app,) = yaml.safe_load(_one(objects, "RayService")["spec"]["serveConfigV2"])["applications"]
    # Tokens reach the app as a mounted file; serveConfigV2 (shown by the dashboard) names it only.
    assert set(app["args"]["auth"]) <= {"required", "token_file", "token_env"}


def _names_a_mounted_secret(env: dict[str, Any]) -> bool:
    """``X_FILE`` pointing into the chart's secret mounts: a path, not the secret."""
    return bool(
        env["name"].endswith("_FILE") and env.get("value", "").startswith("/var/run/secrets/raytseg/")
    )


def test_dicomweb_credentials_are_the_named_secret_mounted_as_files(renders: dict[str, Any]) -> None:
    for pod in _ray_pods(renders["ci"]):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        folder = "/var/run/secrets/raytseg/dicomweb"
        assert env["RAYTSEG_DICOMWEB_USER_FILE"] == f"{folder}/username"
        assert env["RAYTSEG_DICOMWEB_PASSWORD_FILE"] == f"{folder}/password"
        assert "RAYTSEG_DICOMWEB_TOKEN_FILE" not in env
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == folder]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "raytseg-ci-pacs"
    for pod in _ray_pods(renders["default"]):
        assert not [e for e in pod["containers"][0]["env"] if e["name"].startswith("RAYTSEG_DICOMWEB")]


def test_storage_credentials_come_from_the_named_secret(renders: dict[str, Any]) -> None:
    for pod in _ray_pods(renders["ci"]):
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "raytseg-ci-s3"}}]
    cluster = _cluster(renders["ci"])
    assert cluster["authOptions"]["secretName"] == "raytseg-ci-ray-token"
    redis = cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert redis == {"name": "raytseg-ci-redis", "key": "password"}


@pytest.mark.parametrize("values", RENDERS)
def test_weights_are_fetched_not_baked(renders: dict[str, Any], values: str) -> None:
    expected = {"default": None, "ci": "s3://ci-weights/totalsegmentator/"}
    for pod in _ray_pods(renders[values]):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        if values in expected:
            assert env.get("RAYTSEG_WEIGHTS") == expected[values]
        assert env["RAYTSEG_CACHE_DIR"] == "/var/cache/raytseg"
        cache = next(v for v in pod["volumes"] if v["name"] == "raytseg-cache")
        assert "emptyDir" in cache


@pytest.mark.parametrize("values", RENDERS)
def test_pod_monitors_not_service_monitors(renders: dict[str, Any], values: str) -> None:
    objects = renders[values]
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]
    monitors = {
        o["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: o
        for o in objects
        if o["kind"] == "PodMonitor"
    }
    assert set(monitors) == {"head", "worker"}
    assert [e["port"] for e in monitors["head"]["spec"]["podMetricsEndpoints"]] == [
        "metrics",
        "as-metrics",
        "dash-metrics",
    ]
    assert [e["port"] for e in monitors["worker"]["spec"]["podMetricsEndpoints"]] == ["metrics"]
    pod_labels = _cluster(objects)["headGroupSpec"]["template"]["metadata"]["labels"]
    for monitor in monitors.values():
        selector = dict(monitor["spec"]["selector"]["matchLabels"])
        selector.pop("ray.io/node-type")  # KubeRay adds it to the pods
        assert selector.items() <= pod_labels.items()


def test_pod_monitors_carry_the_prometheus_selector_label(renders: dict[str, Any]) -> None:
    for obj in renders["deploy"]:
        if obj["kind"] in ("PodMonitor", "PrometheusRule"):
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_alerts(renders: dict[str, Any], alert_names: tuple[str, ...]) -> None:
    rule = _one(renders["ci"], "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == set(alert_names)
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]
        assert alert["annotations"]["description"]
        # Only this release's series: its namespace and its Ray clusters.
        assert 'namespace="raytseg"' in alert["expr"]
        assert 'ray_io_cluster=~"raytseg-ci-.*"' in alert["expr"]


def test_dashboard_config_map_is_the_dashboard_file(chart: Any, renders: dict[str, Any]) -> None:
    maps = [o for o in renders["default"] if o["kind"] == "ConfigMap"]
    (dashboard,) = maps
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["raytseg.json"]) == json.loads(chart.DASHBOARD.read_text())


@pytest.mark.parametrize("values", RENDERS)
def test_helm_test_pod_calls_readyz(renders: dict[str, Any], values: str) -> None:
    pod = _one(renders[values], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = _one(renders[values], "RayService")["metadata"]["name"]
    script = pod["spec"]["containers"][0]["args"][0]
    assert f"http://{service}-serve-svc:8000/readyz" in script
    # The NetworkPolicy lets it in: it carries the release's pod labels.
    policy = _one(renders[values], "NetworkPolicy")
    release_rule = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert release_rule.items() <= pod["metadata"]["labels"].items()


def test_ray_version_is_pinned_in_one_place_and_agrees(chart: Any, renders: dict[str, Any]) -> None:
    """rayVersion (chart) == RAY_VERSION (scripts/install-runtime.sh, the image) == the Ray
    the tests run == what pyproject admits."""
    import ray
    from packaging.specifiers import SpecifierSet

    install = (chart.REPO / "scripts" / "install-runtime.sh").read_text()
    (pinned,) = re.findall(r"^RAY_VERSION=(\S+)$", install, flags=re.MULTILINE)
    assert '"ray[serve,data]==$RAY_VERSION"' in install
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    assert values["rayVersion"] == pinned
    for objects in renders.values():
        for obj in objects:
            if obj["kind"] in ("RayService", "RayJob"):
                cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
                assert cluster["rayVersion"] == pinned
    assert ray.__version__ == pinned
    import tomllib

    project = tomllib.loads((chart.REPO / "pyproject.toml").read_text())["project"]
    for extra in ("serve", "batch"):
        (spec,) = [d for d in project["optional-dependencies"][extra] if d.startswith("ray[")]
        assert pinned in SpecifierSet(spec.split("]", 1)[1])
