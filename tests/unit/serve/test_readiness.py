"""``/readyz``'s answer from Serve's status of the app (stand-ins for Serve's status objects)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve")

from raytseg.serve.ingress import readiness  # noqa: E402

FAILED_START = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its "
    "constructor or initial health check failing. See controller logs for details. Error:\n"
    "ray::ServeReplica:raytseg:Model300.initialize_and_get_metadata() (pid=812, ip=10.0.0.7)\n"
    '  File "/opt/raytseg/venv/lib/python3.11/site-packages/raytseg/weights/store.py", line 212\n'
    "raytseg.errors.MissingWeightsError: Model 300 (body, fast) is not in /srv/weights: run "
    "`raytseg weights download -t body --fast`"
)


def app(status: str = "RUNNING", **deployments: Any) -> Any:
    return SimpleNamespace(status=SimpleNamespace(value=status), deployments=deployments)


def deployment(status: str, running: int, message: str = "") -> Any:
    return SimpleNamespace(status=status, replica_states={"RUNNING": running}, message=message)


def test_ready_once_every_deployment_runs_a_replica() -> None:
    answer = readiness(app(Ingress=deployment("HEALTHY", 1), Model297=deployment("HEALTHY", 1)))
    assert answer == {"ready": True, "status": "RUNNING", "waiting_for": []}
    loading = readiness(
        app("DEPLOYING", Ingress=deployment("HEALTHY", 1), Model297=deployment("UPDATING", 0))
    )
    assert (loading["ready"], loading["waiting_for"]) == (False, ["Model297"])
    assert readiness(None) == {"ready": False, "waiting_for": ["application"]}


def test_a_model_that_cannot_load_is_named_with_its_error_and_nothing_else() -> None:
    answer = readiness(
        app(
            "DEPLOY_FAILED",
            Ingress=deployment("HEALTHY", 1),
            Model300=deployment("DEPLOY_FAILED", 0, FAILED_START),
            Model297=deployment("UNHEALTHY", 0, "RuntimeError: CUDA error"),
        )
    )
    assert answer["ready"] is False
    assert answer["failed"] == {
        "Model300": "MissingWeightsError",
        "Model297": "the replicas fail to start (see their logs)",
    }
    assert "/srv/weights" not in str(answer)
