"""Prometheus end to end, with the chart's own config, alerts and dashboard.

The service runs locally the way the chart configures it (the CI render's ``serveConfigV2``
app args, with ``local_overrides`` for a GPU-less two-core machine). Debian's Prometheus,
started here on 127.0.0.1, scrapes the node's Ray metrics endpoint with the labels the
chart's PodMonitors add (namespace, ray_io_cluster) and loads the chart's rendered alert
rules. After a segmentation request, the tests ask Prometheus's HTTP API for raytseg's
request counter and stage histogram, run every dashboard query, check that every alert rule
evaluates, and check every metric name the dashboard and the rules use against what the
endpoint really exports.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import Prometheus, prometheus_server

pytest.importorskip("ray.serve")

# Labels the PodMonitors' relabelling and Prometheus give the series of the CI render's
# service (release namespace "raytseg", RayService "raytseg-ci", cluster suffix from KubeRay).
NAMESPACE = "raytseg"
RAY_CLUSTER = "raytseg-ci-local1"
# Dashboard variables as a user would pick them.
VARIABLES = {
    "${datasource}": "prometheus",
    "$namespace": NAMESPACE,
    "$cluster": RAY_CLUSTER,
    "$application": "raytseg",
    "$task": ".*",
    "$__rate_interval": "1m",
    "$__range": "10m",
}
# Panels that must show data after one good and one refused request (the GPU panels need
# a GPU, the batch panels a batch run; both only use names checked below).
PANELS_WITH_DATA = {
    "Segmentations per task and outcome",
    "Errors per task and type",
    "HTTP answers by status",
    "Segmentations in the time range",
    "Voxels segmented per second",
    "Stage latency p50",
    "Stage latency p95",
    "Stage latency p99",
    "End-to-end latency per task",
    "Serve request latency per route",
    "Queue depth",
    "Replicas per deployment: target vs running",
    "Replica start time p90",
    "Model load time p90",
}


@dataclass(frozen=True)
class Local:
    url: str
    metrics_url: str
    config: Any


@pytest.fixture(scope="module")
def service(
    serve_config_v2: dict[str, Any],
    overrides: Callable[..., dict[str, Any]],
    merge: Callable[..., dict[str, Any]],
    weights: Path,
    tokens_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    port: Callable[[], int],
) -> Iterator[Local]:
    import ray

    from raytseg.serve.config import load_config
    from raytseg.serve.local import start_local, stop_local

    if ray.is_initialized():
        pytest.skip("Another test left Ray running in this process")
    (app,) = serve_config_v2["applications"]
    jobs_dir = tmp_path_factory.mktemp("jobs")
    args = merge(app["args"], overrides(weights, tokens_file, jobs_dir, port()))
    config = load_config({**args, "http": {**args["http"], "metrics_export_port": port()}}, {})
    ray_dir = Path(tempfile.mkdtemp(prefix="rtd", dir="/tmp"))  # short: socket paths are length-limited
    try:
        started = start_local(
            config,
            num_cpus=4,
            object_store_memory=300_000_000,
            log_to_driver=False,
            _temp_dir=str(ray_dir),
            _system_config={"metrics_report_interval_ms": 1000},
        )
        assert started.metrics_url
        yield Local(started.url, started.metrics_url, config)
    finally:
        stop_local()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(
    prometheus_binary: str,
    service: Local,
    ci_render: list[dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    (rule,) = [o for o in ci_render if o["kind"] == "PrometheusRule"]
    (work / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    target = service.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "ray",
                "static_configs": [
                    {"targets": [target], "labels": {"namespace": NAMESPACE, "ray_io_cluster": RAY_CLUSTER}}
                ],
            }
        ],
    }
    with prometheus_server(prometheus_binary, config, work) as prometheus:
        yield prometheus


@pytest.fixture(scope="module")
def after_requests(service: Local, prometheus: Prometheus, tiny_ct: bytes, token: str) -> Prometheus:
    """Prometheus once one segmentation succeeded and one upload was refused."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=service.url, headers=headers, timeout=300) as client:
        ok = client.post("/v1/segment", params={"fast": "true"}, content=tiny_ct)
        assert ok.status_code == 200, ok.text
        refused = client.post("/v1/segment", params={"fast": "true"}, content=b"junk" * 100)
        assert refused.status_code == 400
    return prometheus


def test_request_counter_and_stage_histogram_reach_prometheus(
    after_requests: Prometheus, waiter: Callable[..., None]
) -> None:
    prom = after_requests
    ok = 'sum(ray_raytseg_requests_total{task="total", outcome="ok", entrypoint="http"})'
    model = 'sum(ray_raytseg_stage_seconds_count{task="total", stage="model", entrypoint="http"})'
    waiter(lambda: prom.value(ok) >= 1 and prom.value(model) >= 1, 60, "raytseg's series in Prometheus", 1)
    buckets = prom.query('ray_raytseg_stage_seconds_bucket{stage="model", entrypoint="http"}')
    assert {b["metric"]["le"] for b in buckets} >= {"0.1", "1800.0", "+Inf"}
    # The series carry the labels the alerts and the dashboard select on.
    assert {b["metric"]["namespace"] for b in buckets} == {NAMESPACE}
    median = prom.value(
        'histogram_quantile(0.5, sum by (le) (ray_raytseg_stage_seconds_bucket{stage="model"}))'
    )
    assert 0 < median <= 1800
    assert not math.isnan(median)
    failed = 'sum(ray_raytseg_errors_total{error_type="UnreadableImageError", entrypoint="http"})'
    waiter(lambda: prom.value(failed) >= 1, 30, "the refused upload's error count", 1)


def substitute(text: str, variables: dict[str, str] = VARIABLES) -> str:
    """A dashboard expression with its variables replaced by ``variables``' values."""
    for name in sorted(variables, key=len, reverse=True):  # $__range before $__rate_interval...
        text = text.replace(name, variables[name])
    return text


def test_every_dashboard_query_runs(
    after_requests: Prometheus, chart: ModuleType, waiter: Callable[..., None]
) -> None:
    import json

    dashboard = json.loads(chart.DASHBOARD.read_text())
    waiter(
        lambda: after_requests.value("sum(ray_raytseg_requests_total)") >= 2, 60, "both requests counted", 1
    )
    time.sleep(3)  # a few more scrapes, so rate() over the last minute has two points per series
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    empty = []
    for panel in panels:
        results = [after_requests.query(substitute(t["expr"])) for t in panel["targets"]]
        if panel["title"] in PANELS_WITH_DATA and not any(results):
            empty.append(panel["title"])
    assert not empty, f"panels without data: {empty}"
    assert {p["title"] for p in panels} >= PANELS_WITH_DATA
    # The variables' label queries find this service.
    for variable in dashboard["templating"]["list"][1:]:
        metric, label = variable["definition"].removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        answer = httpx.get(
            f"{after_requests.url}/api/v1/label/{label}/values",
            params={"match[]": substitute(metric)},
            timeout=10,
        ).json()
        assert answer["status"] == "success", variable["name"]
        assert answer["data"], variable["name"]


def test_alert_rules_load_and_evaluate(after_requests: Prometheus, waiter: Callable[..., None]) -> None:
    def rules() -> list[dict[str, Any]]:
        groups = httpx.get(f"{after_requests.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def evaluated() -> bool:
        return all(not r["lastEvaluation"].startswith("0001") for r in rules())

    waiter(evaluated, 30, "every rule evaluated once", 1)
    found = rules()
    assert len(found) == 6
    for rule in found:
        assert rule["health"] == "ok", rule
        assert not rule.get("lastError"), rule
    # The selectors find this release's series: with all replicas healthy, "fewer than the
    # target" has nothing to report, but its two sides are both there.
    where = f'{{namespace="{NAMESPACE}", ray_io_cluster=~"raytseg-ci-.*", application="raytseg"}}'
    assert after_requests.query(f"ray_serve_deployment_replica_healthy{where}")
    assert after_requests.query(f"ray_serve_autoscaling_target_replicas{where}")


def _exported_families(metrics_url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=10).text
    families = set()
    for family in text_string_to_metric_families(text):
        # The parser strips _total from counters; Prometheus stores them with it.
        families.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return families


def _gpu_gauges() -> set[str]:
    """Node GPU gauges of Ray's metrics agent: exported only on nodes that have a GPU."""
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    return {
        f"ray_{name}"
        for name, gauge in METRICS_GAUGES.items()
        if "GpuIndex" in [str(column) for column in gauge.view.columns]
    }


def test_every_metric_name_used_is_exported(
    after_requests: Prometheus,
    service: Local,
    chart: ModuleType,
    ci_render: list[dict[str, Any]],
    waiter: Callable[..., None],
) -> None:
    import json

    dashboard = json.loads(chart.DASHBOARD.read_text())
    used: dict[str, str] = {}
    for query in chart.dashboard_queries(dashboard):
        used.update(dict.fromkeys(chart.metric_names(query), query))
    used.update(dict.fromkeys(chart.dashboard_variable_metrics(dashboard), "dashboard variable"))
    for name, expr in chart.rule_expressions(ci_render).items():
        used.update(dict.fromkeys(chart.metric_names(expr), name))

    families = _exported_families(service.metrics_url)
    gpu_only = _gpu_gauges()
    unknown = {
        name: where
        for name, where in used.items()
        if chart.exported_family(name, families) is None and name not in gpu_only
    }
    assert not unknown, f"not exported by Ray {__import__('ray').__version__}: {unknown}"
    # Those on the endpoint also reached Prometheus.
    for name in used:
        if name not in gpu_only:
            assert after_requests.query(f"count({name})"), name
    # The names let through only because this machine has no GPU.
    assert used.keys() & gpu_only == {
        "ray_node_gram_used",
        "ray_node_gram_available",
        "ray_node_gpus_utilization",
    }
