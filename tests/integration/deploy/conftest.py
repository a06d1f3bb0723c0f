"""Fixtures of the deployment integration tests: the chart's config, tiny weights, a CT.

Helm and Prometheus (``chart``, ``prometheus_binary`` in ``tests/conftest.py``) come from
``scripts/setup-ci-tools.sh``; without them these tests skip, or fail under
``RAYTSEG_REQUIRE_DEPLOY_TOOLS=1`` (``scripts/test.sh``). Helpers reach tests as fixtures
(pytest runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import pytest
import yaml

from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_CT = REPO / "examples" / "data" / "example_ct_sm.nii.gz"
TOKEN = "deploy-integration-token-0123456789"


@pytest.fixture(scope="session")
def ci_render(chart: ModuleType) -> list[dict[str, Any]]:
    """The chart rendered with its CI values (release namespace "raytseg")."""
    objects: list[dict[str, Any]] = chart.template([chart.CI_VALUES])
    return objects


@pytest.fixture(scope="session")
def serve_config_v2(ci_render: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = [o for o in ci_render if o["kind"] == "RayService"]
    config: dict[str, Any] = yaml.safe_load(service["spec"]["serveConfigV2"])
    return config


def merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        out[key] = (
            merged(below, value) if isinstance(value, Mapping) and isinstance(below, Mapping) else value
        )
    return out


@pytest.fixture(scope="session")
def merge() -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]:
    return merged


# What running the chart's app on this machine changes: no GPU, small CPU shares (the
# deployments share two cores), tiny weights, local token file and job folder, free ports.
def local_overrides(weights: Path, tokens: Path, jobs_dir: Path, http_port: int) -> dict[str, Any]:
    small = {"num_cpus": 0.25}
    return {
        "device": "cpu",
        "torch_threads": 1,
        "weights": str(weights),
        "models": {**small, "num_gpus": 0, "health_check_period_s": 2},
        "pool": {**small, "num_gpus": 0},
        "preprocess": small,
        "postprocess": small,
        "ingress": {"num_replicas": 1},  # the chart's: on the head, which has no CPUs for it
        "auth": {"token_file": str(tokens)},
        "jobs": {"allowed_prefixes": [str(jobs_dir)]},
        "http": {"host": "127.0.0.1", "port": http_port},
    }


@pytest.fixture(scope="session")
def overrides() -> Callable[..., dict[str, Any]]:
    return local_overrides


@pytest.fixture(scope="session")
def port() -> Callable[[], int]:
    return free_port


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)  # 297, the 3 mm model the CI values serve
    return root


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "tokens"
    path.write_text(f"{TOKEN}\n")
    return path


@pytest.fixture(scope="session")
def token() -> str:
    return TOKEN


@pytest.fixture(scope="session")
def tiny_ct() -> bytes:
    """A corner of the example CT: the cheapest good request (``--fast``)."""
    img: Any = nib.load(EXAMPLE_CT)
    return gzip.compress(img.slicer[40:64, 40:64, 10:20].to_bytes(), mtime=0)
