"""The dashboard and the alert rules, without a running service.

- every raytseg metric they use is one ``raytseg/metrics.py`` defines, under the name Ray
  exports it with (``ray_`` prefix, ``_total`` for counters, histogram series suffixes);
  Ray's own metric names are checked against a live service in tests/integration/deploy;
- the dashboard shows what it must (requests and errors per task, stage latency quantiles,
  queues, replicas, GPU memory, batch progress);
- the rendered PrometheusRule passes ``promtool check rules``, and ``promtool test rules``
  fires each alert on synthetic series shaped like the real ones (and not on healthy ones).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from raytseg import metrics


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("RAYTSEG_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail("promtool not found (run scripts/setup-ci-tools.sh)")
        pytest.skip("promtool not found: run scripts/setup-ci-tools.sh")
    return found


@pytest.fixture(scope="module")
def dashboard(chart: Any) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(chart.DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def rules(renders: dict[str, Any]) -> dict[str, Any]:
    (rule,) = [o for o in renders["ci"] if o["kind"] == "PrometheusRule"]
    return dict(rule["spec"])


def test_dashboard_structure(dashboard: dict[str, Any], chart: Any) -> None:
    assert dashboard["uid"] == "raytseg"
    assert dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["gridPos"]["x"] >= 0
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "namespace", "cluster", "application", "task"]
    # Every query is scoped to the chosen namespace and Ray cluster.
    for query in chart.dashboard_queries(dashboard):
        for selector in re.findall(r"\b(ray_\w+)\{([^}]*)\}", query):
            assert 'namespace=~"$namespace"' in selector[1], query
            assert 'ray_io_cluster=~"$cluster"' in selector[1], query


def _raytseg_series() -> set[str]:
    """Every series name Prometheus sees for raytseg's metrics."""
    names = set()
    for spec in metrics.ALL:
        if spec.kind == "histogram":
            names |= {f"{spec.exported_name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(spec.exported_name)
    return names


def _all_names(chart: Any, dashboard: dict[str, Any], rules: dict[str, Any]) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for query in chart.dashboard_queries(dashboard):
        for name in chart.metric_names(query):
            used.setdefault(name, set()).add(query)
    for name in chart.dashboard_variable_metrics(dashboard):
        used.setdefault(name, set()).add("dashboard variable")
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in chart.metric_names(rule["expr"]):
                used.setdefault(name, set()).add(rule["alert"])
    return used


def test_metric_name_extraction(chart: Any) -> None:
    expr = (
        'histogram_quantile(0.95, sum by (stage, le) (rate(ray_raytseg_stage_seconds_bucket{a=~"x|y", '
        'b="sum(c)"}[$__rate_interval]))) / on() group_left sum(ray_node_gram_used) * 1024 > bool 3'
    )
    assert chart.metric_names(expr) == {"ray_raytseg_stage_seconds_bucket", "ray_node_gram_used"}


def test_raytseg_metrics_used_are_defined(
    chart: Any, dashboard: dict[str, Any], rules: dict[str, Any]
) -> None:
    used = _all_names(chart, dashboard, rules)
    defined = _raytseg_series()
    ours = {name for name in used if name.startswith("ray_raytseg_")}
    assert ours <= defined, {n: used[n] for n in ours - defined}
    # raytseg's metrics are all on the dashboard.
    families = {chart.exported_family(n, {s.exported_name for s in metrics.ALL}) for n in ours}
    assert families == {spec.exported_name for spec in metrics.ALL}
    # The rest are Ray's (checked against a live service's endpoint in tests/integration/deploy).
    assert all(n.startswith(("ray_raytseg_", "ray_serve_", "ray_node_")) for n in used), sorted(used)


def test_dashboard_shows_what_operators_need(chart: Any, dashboard: dict[str, Any]) -> None:
    queries = chart.dashboard_queries(dashboard)
    text = "\n".join(queries)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, q) for q in queries)

    assert has(r"sum by \(task, outcome\).*ray_raytseg_requests_total")
    assert has(r"sum by \(task, error_type\).*ray_raytseg_errors_total")
    for quantile in ("0.5", "0.95", "0.99"):
        assert has(rf"histogram_quantile\({quantile}, sum by \(stage, le\).*ray_raytseg_stage_seconds_bucket")
    assert "ray_raytseg_queue_depth" in text
    assert "ray_serve_deployment_queued_queries" in text
    assert "ray_serve_autoscaling_target_replicas" in text
    assert "ray_serve_deployment_replica_healthy" in text
    assert "ray_node_gram_used" in text
    assert has(r'ray_raytseg_requests_total\{[^}]*entrypoint="batch"')
    assert "* 3600" in text


def _rules_file(tmp_path: Path, rules: dict[str, Any]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rules["groups"]}, sort_keys=False))
    return path


def test_rules_pass_promtool_check(tmp_path: Path, rules: dict[str, Any]) -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(_rules_file(tmp_path, rules))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


# Series as the PodMonitors deliver them for the CI render (release namespace "raytseg",
# RayService "raytseg-ci"), with the labels Ray and raytseg put on them.
WHERE = 'namespace="raytseg",ray_io_cluster="raytseg-ci-abcde"'
BATCH = 'namespace="raytseg",ray_io_cluster="raytseg-ci-batch-fghij"'
OTHER = 'namespace="other",ray_io_cluster="someone-else-xyz"'
STARTUP = "ray_serve_replica_startup_latency_ms_bucket"
HEALTHY = "ray_serve_deployment_replica_healthy"
TARGET = "ray_serve_autoscaling_target_replicas"
MODEL = 'application="raytseg",deployment="Model297"'
QUEUE_ALERT_TEXT = (
    "40 http segmentations are queued or running in raytseg-ci-abcde. "
    "Add model replicas (serve.models.autoscaling.max_replicas) or GPU workers "
    "(gpuWorkers.maxReplicas), or check for GPU pods that cannot be scheduled."
)


def _alert_tests(alert_names: tuple[str, ...]) -> list[dict[str, Any]]:
    http = "ray_serve_num_http_requests_total"
    return [
        {
            "interval": "1m",
            "input_series": [
                {"series": f'ray_raytseg_queue_depth{{{WHERE},entrypoint="http"}}', "values": "40x20"},
                {"series": f'ray_raytseg_queue_depth{{{WHERE},entrypoint="job"}}', "values": "1x20"},
                # Another release's backlog is not ours.
                {"series": f'ray_raytseg_queue_depth{{{OTHER},entrypoint="http"}}', "values": "99x20"},
                {"series": f'{http}{{{WHERE},application="raytseg",status_code="200"}}', "values": "0+60x20"},
                {"series": f'{http}{{{WHERE},application="raytseg",status_code="503"}}', "values": "0+30x20"},
                {
                    "series": f'{HEALTHY}{{{WHERE},{MODEL},replica="a"}}',
                    "values": "1x20",
                },
                {
                    "series": f'{HEALTHY}{{{WHERE},{MODEL},replica="b"}}',
                    "values": "0x20",
                },
                {
                    "series": f"{TARGET}{{{WHERE},{MODEL}}}",
                    "values": "2x20",
                },
                # Every replica start in the last hour took about 15 min (bucket 1800000 ms).
                *(
                    {
                        "series": f'{STARTUP}{{{WHERE},{MODEL},le="{le}"}}',
                        "values": values,
                    }
                    for le, values in (
                        ("480000", "0x20"),
                        ("900000", "0x20"),
                        ("1800000", "0+1x20"),
                        ("+Inf", "0+1x20"),
                    )
                ),
                {
                    "series": "ray_raytseg_requests_total"
                    f'{{{BATCH},entrypoint="batch",outcome="failed",task="total"}}',
                    "values": "0 0 0 0 0 1 2+0x25",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "15m",
                    "alertname": "RaytsegQueueDepthHigh",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "raytseg",
                                "ray_io_cluster": "raytseg-ci-abcde",
                                "entrypoint": "http",
                            },
                            "exp_annotations": {
                                "summary": "raytseg holds a backlog of segmentations",
                                "description": QUEUE_ALERT_TEXT,
                            },
                        }
                    ],
                },
                {"eval_time": "15m", "alertname": "RaytsegHigh5xxRatio", "exp_alerts": [_fired("critical")]},
                {
                    "eval_time": "15m",
                    "alertname": "RaytsegReplicaUnhealthy",
                    "exp_alerts": [_fired("critical", application="raytseg", deployment="Model297")],
                },
                {
                    "eval_time": "16m",
                    "alertname": "RaytsegReplicasBelowTarget",
                    "exp_alerts": [_fired("warning", application="raytseg", deployment="Model297")],
                },
                {
                    "eval_time": "15m",
                    "alertname": "RaytsegSlowReplicaStart",
                    "exp_alerts": [_fired("warning", application="raytseg", deployment="Model297")],
                },
                {
                    "eval_time": "10m",
                    "alertname": "RaytsegBatchItemsFailed",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "raytseg",
                                "ray_io_cluster": "raytseg-ci-batch-fghij",
                                "task": "total",
                            }
                        }
                    ],
                },
                # Quiet again once no item failed for a whole window.
                {"eval_time": "25m", "alertname": "RaytsegBatchItemsFailed", "exp_alerts": []},
            ],
        },
        {
            # A healthy service: nothing fires.
            "interval": "1m",
            "input_series": [
                {"series": f'ray_raytseg_queue_depth{{{WHERE},entrypoint="http"}}', "values": "3x30"},
                {"series": f'{http}{{{WHERE},application="raytseg",status_code="200"}}', "values": "0+60x30"},
                {"series": f'{http}{{{WHERE},application="raytseg",status_code="500"}}', "values": "0+1x30"},
                {
                    "series": f'{HEALTHY}{{{WHERE},{MODEL},replica="a"}}',
                    "values": "1x30",
                },
                {
                    "series": f"{TARGET}{{{WHERE},{MODEL}}}",
                    "values": "1x30",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": name, "exp_alerts": []} for name in alert_names
            ],
        },
    ]


def _fired(severity: str, **labels: str) -> dict[str, Any]:
    return {
        "exp_labels": {
            "severity": severity,
            "namespace": "raytseg",
            "ray_io_cluster": "raytseg-ci-abcde",
            **labels,
        }
    }


def test_alerts_fire_on_synthetic_series(
    tmp_path: Path, rules: dict[str, Any], alert_names: tuple[str, ...]
) -> None:
    # promtool compares annotations whole; they are checked for one alert (its templating),
    # the others' are left out here (`promtool check rules` validates their templates).
    groups = json.loads(json.dumps(rules["groups"]))
    for group in groups:
        for rule in group["rules"]:
            if rule["alert"] != "RaytsegQueueDepthHigh":
                rule.pop("annotations")
    rules_file = _rules_file(tmp_path, {"groups": groups})
    tests = tmp_path / "tests.yaml"
    tests.write_text(
        yaml.safe_dump({"rule_files": [rules_file.name], "tests": _alert_tests(alert_names)}, sort_keys=False)
    )
    done = subprocess.run(
        [_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
