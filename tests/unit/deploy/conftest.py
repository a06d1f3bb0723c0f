"""Fixtures of the chart tests: renders of the chart, the CRD schemas, the alert names.

The ``chart`` fixture (``tests/conftest.py``) needs helm from ``scripts/setup-ci-tools.sh``
(``.cache/tools/bin/helm``, or ``$HELM``); without it these tests skip, or fail under
``RAYTSEG_REQUIRE_DEPLOY_TOOLS=1`` (``scripts/test.sh``).

The CRDs are KubeRay v1.7.0's and prometheus-operator's, shared beside the repository
(``../shared/data/crds``). Helpers reach tests as fixtures (pytest runs with
``--import-mode=importlib``).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CRDS = REPO.parent / "shared" / "data" / "crds"
CRD_FILES = {
    ("ray.io", "RayService"): CRDS / "kuberay-v1.7.0" / "ray.io_rayservices.yaml",
    ("ray.io", "RayJob"): CRDS / "kuberay-v1.7.0" / "ray.io_rayjobs.yaml",
    ("ray.io", "RayCluster"): CRDS / "kuberay-v1.7.0" / "ray.io_rayclusters.yaml",
    ("monitoring.coreos.com", "PodMonitor"): CRDS
    / "prometheus-operator"
    / "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): CRDS
    / "prometheus-operator"
    / "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): CRDS
    / "prometheus-operator"
    / "monitoring.coreos.com_prometheusrules.yaml",
}


@pytest.fixture(scope="session")
def render(chart: ModuleType) -> Any:
    """``render(values_files, sets)`` -> rendered objects (cached per arguments)."""
    cache: dict[tuple[tuple[str, ...], tuple[str, ...]], list[dict[str, Any]]] = {}

    def run(values: tuple[Path, ...] = (), sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        key = (tuple(str(v) for v in values), tuple(sets))
        if key not in cache:
            cache[key] = chart.template(values, sets=sets)
        return cache[key]

    return run


# Every alert of the chart's PrometheusRule.
ALERT_NAMES = (
    "RaytsegQueueDepthHigh",
    "RaytsegHigh5xxRatio",
    "RaytsegReplicaUnhealthy",
    "RaytsegReplicasBelowTarget",
    "RaytsegSlowReplicaStart",
    "RaytsegBatchItemsFailed",
)


@pytest.fixture(scope="session")
def alert_names() -> tuple[str, ...]:
    return ALERT_NAMES


# The renders every test looks at: defaults, the CI values, the deploy/k8s values.
RENDERS = ("default", "ci", "deploy")


@pytest.fixture(scope="session")
def renders(chart: ModuleType, render: Any) -> dict[str, list[dict[str, Any]]]:
    return {
        "default": render(),
        "ci": render((chart.CI_VALUES,)),
        "deploy": render((chart.DEPLOY_VALUES,)),
    }


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """``(group, version, kind) -> openAPIV3Schema`` of every shared CRD."""
    if not CRDS.exists():
        pytest.fail(f"CRDs not found at {CRDS}")
    schemas = {}
    for (group, kind), path in CRD_FILES.items():
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["group"] == group
        assert crd["spec"]["names"]["kind"] == kind
        for version in crd["spec"]["versions"]:
            schemas[(group, version["name"], kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} {kind} objects named {name}"
    return matches[0]


@pytest.fixture(scope="session")
def find_one() -> Any:
    return find
