"""The job API: local and file:// outputs, the allow-list, and state that outlives the ingress."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from raytseg.pipeline.records import SegmentOptions
from tests.integration.serve.conftest import wait_for_job


@pytest.fixture(scope="module")
def job_input(service: Any, ct: bytes) -> Path:
    path = service.jobs_dir / "in" / "ct.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ct)
    return Path(path)


def test_job_writes_a_local_output(
    api: httpx.Client,
    service: Any,
    job_input: Path,
    ct: bytes,
    reference: Callable[[bytes, SegmentOptions], bytes],
) -> None:
    out = service.jobs_dir / "out" / "case1"
    body = {
        "input_uri": str(job_input),
        "output_uri": str(out),
        "options": {"fast": True, "statistics": True},
    }
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["state"] in ("queued", "running")
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    record = wait_for_job(api, job["id"])
    assert record["state"] == "succeeded", record
    assert record["outputs"] == [str(out / "segmentation.nii.gz"), str(out / "statistics.json")]
    run = record["report"]
    assert (run["task"], run["device"], run["fast"], run["num_classes"]) == ("total", "cpu", True, 117)
    assert (run["input"], run["output"], run["outputs"]) == (str(job_input), str(out), record["outputs"])
    assert list(run["backends"].values()) == ["torch"]  # the model replica's
    assert (out / "segmentation.nii.gz").read_bytes() == reference(
        ct, SegmentOptions(task="total", fast=True)
    )
    assert sorted(p.name for p in out.iterdir()) == ["segmentation.nii.gz", "statistics.json"]  # staging gone


def test_job_writes_to_a_file_uri(api: httpx.Client, service: Any, job_input: Path) -> None:
    # (Not memory://: a job's files are staged by a replica and committed by the job actor,
    # and an in-memory filesystem belongs to one process.)
    out = service.jobs_dir / "out" / "case2"
    body = {"input_uri": f"file://{job_input}", "output_uri": f"file://{out}/", "options": {"fast": True}}
    job = api.post("/v1/jobs", json=body).json()
    record = wait_for_job(api, job["id"])
    assert record["state"] == "succeeded", record
    assert record["outputs"] == [str(out / "segmentation.nii.gz")]  # file:// is read as a path
    assert [p.name for p in out.iterdir()] == ["segmentation.nii.gz"]


def test_failed_job_reports_its_error(api: httpx.Client, service: Any) -> None:
    bad = service.jobs_dir / "in" / "bad.nii.gz"
    bad.write_bytes(b"not an image at all")
    body = {
        "input_uri": str(bad),
        "output_uri": str(service.jobs_dir / "out" / "bad"),
        "options": {"fast": True},
    }
    record = wait_for_job(api, api.post("/v1/jobs", json=body).json()["id"])
    assert record["state"] == "failed"
    assert record["error"]["type"] == "UnreadableImageError"
    assert record["error"]["status"] == 400


@pytest.mark.parametrize(
    ("field", "uri"),
    [
        ("input_uri", "/etc/passwd"),
        ("input_uri", "s3://somebody-elses-bucket/ct.nii.gz"),
        ("output_uri", "memory://raytseg-jobs-other/x/"),
        ("output_uri", "JOBS/../../escape"),
    ],
)
def test_uris_outside_the_allow_list_are_403(
    api: httpx.Client, service: Any, job_input: Path, field: str, uri: str
) -> None:
    uri = uri.replace("JOBS", str(service.jobs_dir))
    body = {"input_uri": str(job_input), "output_uri": str(service.jobs_dir / "out" / "x"), field: uri}
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["type"] == "UriNotAllowedError"


def test_job_request_validation(api: httpx.Client, service: Any, job_input: Path) -> None:
    out = str(service.jobs_dir / "out" / "y")
    assert (
        api.post("/v1/jobs", json={"input_uri": str(job_input), "output_uri": out, "bogus": 1}).status_code
        == 422
    )
    unknown = {"input_uri": str(job_input), "output_uri": out, "task": "nope"}
    assert api.post("/v1/jobs", json=unknown).status_code == 404
    assert api.get("/v1/jobs/no-such-job").status_code == 404


def test_job_state_survives_an_ingress_restart(
    api: httpx.Client, service: Any, job_input: Path, waiter: Callable[..., None]
) -> None:
    body = {
        "input_uri": str(job_input),
        "output_uri": str(service.jobs_dir / "out" / "case3"),
        "options": {"fast": True},
    }
    job_id = api.post("/v1/jobs", json=body).json()["id"]
    for name in _replica_actors("Ingress"):
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def answers() -> bool:
        try:
            return api.get(f"/v1/jobs/{job_id}").status_code == 200
        except httpx.HTTPError:
            return False

    waiter(answers, 60, "a new ingress replica")
    assert wait_for_job(api, job_id)["state"] == "succeeded"


def _replica_actors(deployment: str) -> list[str]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return [n for n in names if f"#{deployment}#" in n]
