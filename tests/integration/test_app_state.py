"""What holds for the whole app, not one replica: job records, admission limits, outages.

A local Ray runs a small Serve app (``total`` fast, tiny synthetic weights, two ingress
replicas as the chart deploys) whose job store is ``s3://<bucket>/records`` on the moto
server.

Durable jobs: jobs are queued one at a time; the cluster is then torn down with jobs still
queued or running and started again on the same config: finished jobs keep their records
and are not run again, the others run and succeed, an ``Idempotency-Key`` still names its
job. Then the job actor alone is killed mid-job (Ray restarts it) and its jobs finish too.

Storage outage: the S3 server stops for 10 s while jobs run; every job still succeeds.

A model that cannot load: ``/readyz`` names it and its error; the other tasks are served.

A rolling update: the app redeployed with another config under load loses no request;
nor does a model replica scaled down under load.

Admission: ``limits.max_queued_requests`` and ``jobs.max_pending`` bound the app, whichever
ingress replica a request reaches.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from raytseg.serve.config import ServeConfig, load_config
from tests.integration.conftest import Outage, StoppableS3, free_port

pytest.importorskip("ray.serve")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

T = TypeVar("T")
Answer = tuple[int, str | None]  # a client's status, and the Retry-After (or the error) it got
BUCKET = "raytseg-durable-jobs"
EXAMPLE_CT = Path(__file__).resolve().parents[2] / "examples" / "data" / "example_ct_sm.nii.gz"
KEY = "a1b2c3d4-durable-job-key"


@pytest.fixture
def data(s3: Any, stoppable_s3: StoppableS3, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The bucket, holding the example CT as ``data/in/ct.nii.gz``; the Ray processes started
    from here reach it through the stoppable S3 server (the same objects)."""
    s3.put_file(str(EXAMPLE_CT), f"{BUCKET}/data/in/ct.nii.gz")
    monkeypatch.setenv("AWS_ENDPOINT_URL", stoppable_s3.url)
    return s3


MAX_QUEUED = 4
OUTAGE_S = 10.0


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    """A short private Ray temp dir (socket paths are length-limited)."""
    folder = Path(tempfile.mkdtemp(prefix="rta", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def app_config(tmp_path: Path, max_pending: int, **changes: Any) -> ServeConfig:
    """The app: ``total`` fast (tiny weights), S3 job store, two ingress replicas; ``changes``
    replace top-level keys."""
    from raytseg.weights.synth import synthesize_task

    synthesize_task("total", tmp_path / "weights", fast=True, tiny=True)
    small = {"num_cpus": 0.25}
    return load_config(
        {
            "device": "cpu",
            "torch_threads": 1,
            "weights": str(tmp_path / "weights"),
            "tasks": {"total": {"modes": ["fast"]}},
            "models": {**small, "num_gpus": 0},
            "pool": {**small, "num_gpus": 0},
            "preprocess": small,
            "postprocess": small,
            "ingress": {**small, "num_replicas": 2},
            "limits": {"max_queued_requests": MAX_QUEUED, "overload_status": 429, "retry_after_s": 2},
            "jobs": {
                "allowed_prefixes": [f"s3://{BUCKET}/data/"],
                "store": f"s3://{BUCKET}/records/{tmp_path.name}",
                "max_running": 1,
                "max_pending": max_pending,
            },
            "http": {"port": free_port(), "metrics_export_port": free_port()},
            **changes,
        },
        {},
    )


@contextlib.contextmanager
def cluster(config: ServeConfig, ray_dir: Path) -> Iterator[httpx.Client]:
    """A fresh local Ray cluster serving ``config``; torn down on exit."""
    from raytseg.serve.local import start_local, stop_local

    try:
        started = start_local(
            config, num_cpus=3, object_store_memory=300_000_000, log_to_driver=False, _temp_dir=str(ray_dir)
        )
        with httpx.Client(base_url=started.url, timeout=120) as api:
            yield api
    finally:
        stop_local()


def submit(api: httpx.Client, name: str, key: str | None = None) -> httpx.Response:
    body = {"input_uri": f"s3://{BUCKET}/data/in/ct.nii.gz", "output_uri": f"s3://{BUCKET}/data/out/{name}"}
    headers = {"Idempotency-Key": key} if key else {}
    return api.post("/v1/jobs", json={**body, "options": {"fast": True}}, headers=headers)


def states(api: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each job's record; while the job actor restarts, a 503 stands in for it."""
    answers = {i: api.get(f"/v1/jobs/{i}") for i in ids}
    return {i: a.json() if a.is_success else {"state": f"HTTP {a.status_code}"} for i, a in answers.items()}


def finished(api: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """The jobs' records once every one succeeded or failed, else None."""
    records = states(api, ids)
    return records if all(r["state"] in ("succeeded", "failed") for r in records.values()) else None


def succeeded(api: httpx.Client, ids: list[str], timeout_s: float, what: str) -> dict[str, dict[str, Any]]:
    """The jobs' records once they finished; fails unless every one succeeded."""
    records = wait_until(lambda: finished(api, ids), timeout_s, what)
    failures = {i: r["error"] for i, r in records.items() if r["state"] != "succeeded"}
    assert not failures, f"{what}: {failures}"
    return records


def wait_until(check: Callable[[], T], timeout_s: float, what: str) -> T:
    """The first true answer of ``check``, asked every 0.2 s."""
    deadline = time.monotonic() + timeout_s
    while not (answer := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return answer


def tiny_ct() -> bytes:
    """A corner of the example CT: many requests a second."""
    import gzip

    import nibabel as nib

    img: Any = nib.load(EXAMPLE_CT)
    return gzip.compress(img.slicer[40:64, 40:64, 10:20].to_bytes(), mtime=0)


def replicas() -> set[str]:
    """The names of the app's Serve replica actors."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in actors if a["name"].startswith("SERVE_REPLICA::")}


def model_replicas() -> set[str]:
    """The names of the replicas of the app's model deployment (``total`` --fast's)."""
    return {name for name in replicas() if "#Model297#" in name}


def kill_job_actor(restart: bool) -> None:
    import ray

    ray.kill(ray.get_actor("raytseg-jobs", namespace="raytseg"), no_restart=not restart)


def test_jobs_survive_a_cluster_restart_and_a_lost_job_actor(
    data: Any, tmp_path: Path, ray_dir: Path
) -> None:
    config = app_config(tmp_path, max_pending=8)
    with cluster(config, ray_dir) as api:
        first = submit(api, "j0", KEY)
        assert first.status_code == 202, first.text
        ids = [first.json()["id"]] + [submit(api, f"j{n}").json()["id"] for n in range(1, 4)]
        wait_until(lambda: states(api, ids[:1])[ids[0]]["state"] == "succeeded", 180, "the first job")
        before = states(api, ids)
        kill_job_actor(restart=False)  # nothing of this cluster commits anything after this
    unfinished = [i for i in ids if before[i]["state"] in ("queued", "running")]
    assert unfinished, f"every job finished before the restart: {before}"

    with cluster(config, ray_dir) as api:
        after = succeeded(api, ids, 300, "the recovered jobs")
        assert after[ids[0]]["finished_at"] == before[ids[0]]["finished_at"]  # not run again
        replay = submit(api, "j0", KEY)
        assert (replay.status_code, replay.headers.get("Idempotent-Replayed")) == (202, "true")
        assert replay.json()["id"] == ids[0]
        assert submit(api, "elsewhere", KEY).status_code == 409
        assert api.get(f"/v1/jobs/{'0' * 32}").status_code == 404

        later = [submit(api, f"k{n}").json()["id"] for n in range(2)]
        wait_until(lambda: states(api, later[:1])[later[0]]["state"] == "running", 120, "a running job")
        kill_job_actor(restart=True)
        succeeded(api, later, 300, "the jobs of the restarted job actor")

    outputs = {i: after[i]["outputs"] for i in ids}
    for written in outputs.values():
        assert [data.cat_file(w.removeprefix("s3://")) for w in written] == [
            data.cat_file(w.removeprefix("s3://")) for w in outputs[ids[0]]
        ]  # the same segmentation of the same CT, whole
    folder = f"{BUCKET}/records/{tmp_path.name}/raytseg/jobs"
    records = [json.loads(data.cat_file(p)) for p in data.ls(folder, refresh=True)]
    assert sorted(r["id"] for r in records) == sorted(ids + later)
    assert all(r["state"] == "succeeded" for r in records)
    commits = data.ls(f"{BUCKET}/records/{tmp_path.name}/raytseg/commits", refresh=True)
    assert len(commits) == len(records)  # one committed run per job
    assert not [key for key in data.find(f"{BUCKET}/data/out") if ".raytseg-staging" in key]


def test_queue_limits_hold_for_the_app_across_ingress_replicas(
    data: Any, tmp_path: Path, ray_dir: Path
) -> None:
    config, ct = app_config(tmp_path, max_pending=2), EXAMPLE_CT.read_bytes()
    with cluster(config, ray_dir) as api:
        with ThreadPoolExecutor(10) as pool:  # each segmentation holds its slot for seconds
            answers = list(
                pool.map(lambda _: api.post("/v1/segment", params={"fast": "true"}, content=ct), range(10))
            )
        admitted = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 429]
        assert len(admitted) + len(refused) == len(answers), [a.text for a in answers]
        assert 2 <= len(admitted) <= MAX_QUEUED  # 4 per replica before: up to 8 got in
        assert all(a.headers["Retry-After"] == "2" for a in refused)

        jobs = [submit(api, f"p{n}").status_code for n in range(6)]
        # max_running 1 + max_pending 2 at most, whichever replica took the submission
        assert jobs.count(202) <= 3, jobs
        assert set(jobs) == {202, 429}, jobs


def test_jobs_ride_out_a_storage_outage(
    data: Any, stoppable_s3: StoppableS3, tmp_path: Path, ray_dir: Path
) -> None:
    config = app_config(tmp_path, max_pending=8)
    with cluster(config, ray_dir) as api:
        ids = [submit(api, f"o{n}").json()["id"] for n in range(3)]
        running = lambda: states(api, ids[:1])[ids[0]]["state"] == "running"  # noqa: E731
        outage = Outage(stoppable_s3, running, OUTAGE_S)
        records = succeeded(api, ids, 300, "the jobs, through the outage")
        restarted = outage.join()
    assert max(r["finished_at"] for r in records.values()) >= restarted
    outputs = [data.cat_file(w.removeprefix("s3://")) for r in records.values() for w in r["outputs"]]
    assert len(outputs) == len(ids)
    assert len(set(outputs)) == 1  # the same segmentation of the same CT, whole


def test_a_model_that_cannot_load_is_named_by_readyz(data: Any, tmp_path: Path, ray_dir: Path) -> None:
    """``body`` fast is served but its weights are missing (Model300): the deployment fails,
    ``/readyz`` names it with its error, the tasks whose models load are served, and a
    request for ``body`` is answered 503 at once, naming the model and its error."""
    from raytseg.serve.local import start_local, stop_local

    tasks = {"total": {"modes": ["fast"]}, "body": {"modes": ["fast"]}}
    config = app_config(tmp_path, max_pending=2, tasks=tasks)
    url = f"http://127.0.0.1:{config.http.port}"
    try:
        with pytest.raises(RuntimeError, match="Model300"):
            start_local(config, num_cpus=3, log_to_driver=False, _temp_dir=str(ray_dir))
        ready = httpx.get(f"{url}/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json() == {
            "ready": False,
            "status": "DEPLOY_FAILED",
            "waiting_for": ["Model300"],
            "failed": {"Model300": "MissingWeightsError"},
        }
        total = httpx.post(
            f"{url}/v1/segment", params={"fast": "true"}, content=EXAMPLE_CT.read_bytes(), timeout=120
        )
        assert total.status_code == 200, total.text
        # A request that needs it is refused at once (the app would hold it request_timeout_s,
        # 1800 s here: the client's 120 s would run out first), saying what to fix.
        body = httpx.post(
            f"{url}/v1/segment",
            params={"task": "body", "fast": "true"},
            content=EXAMPLE_CT.read_bytes(),
            timeout=120,
        )
        assert body.status_code == 503, body.text
        error = body.json()["error"]
        assert error["type"] == "ModelUnavailableError"
        assert "Model300" in error["message"]
        assert "MissingWeightsError" in error["message"]
    finally:
        stop_local()


def answers_under_load(api: httpx.Client, change: Callable[[], None]) -> tuple[list[Answer], int]:
    """Two clients segment a small CT without pause from 2 s before ``change()`` until 2 s
    after it returns: every (status, Retry-After or error), and how many came before the end
    of ``change()``."""
    ct, stop, answers = tiny_ct(), threading.Event(), []

    def client() -> None:
        while not stop.is_set():
            try:
                answer = api.post("/v1/segment", params={"fast": "true"}, content=ct)
                answers.append((answer.status_code, answer.headers.get("Retry-After")))
            except httpx.HTTPError as exc:
                answers.append((0, repr(exc)))

    with ThreadPoolExecutor(2) as pool:
        clients = [pool.submit(client) for _ in range(2)]
        time.sleep(2.0)
        change()
        during = len(answers)
        time.sleep(2.0)
        stop.set()
        for done in clients:
            done.result()
    return answers, during


def lost(answers: list[Answer]) -> list[Answer]:
    """The answers a client could not act on: not 200, 429 or 503, or a refusal without Retry-After."""
    return [a for a in answers if a[0] not in (200, 429, 503) or (a[0] != 200 and a[1] is None)]


def test_a_rolling_config_update_under_load_loses_no_request(
    data: Any, tmp_path: Path, ray_dir: Path
) -> None:
    """The app is redeployed with another config while clients segment and jobs run: every
    request is answered (200, or 429/503 with Retry-After) and every accepted job succeeds."""
    from ray import serve

    from raytseg.serve.app import build_app

    config = app_config(tmp_path, max_pending=8)
    updated = config.model_copy(update={"limits": config.limits.model_copy(update={"retry_after_s": 3})})
    with cluster(config, ray_dir) as api:
        ids = [submit(api, f"u{n}").json()["id"] for n in range(3)]
        before = replicas()
        answers, during = answers_under_load(
            api, lambda: serve.run(build_app(updated), name=config.app_name, route_prefix="/")
        )
        records = succeeded(api, ids, 300, "the jobs accepted before the update")
        assert not before & replicas(), "the update replaced no replica"
    assert during < len(answers)  # requests went on through the update and after it
    assert not lost(answers), lost(answers)
    assert len(records) == len(ids)


def test_a_model_replica_scaled_down_under_load_loses_no_request(
    data: Any, tmp_path: Path, ray_dir: Path
) -> None:
    """The model's deployment starts with two replicas; under two clients' load its
    autoscaler wants one, and Serve stops the other while requests go on: the replica that
    stops finishes what it holds first (graceful shutdown), so every request is answered
    (200, or 429/503 with Retry-After)."""
    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "initial_replicas": 2,
        "target_ongoing_requests": 2,  # two clients: one replica is enough
        "upscale_delay_s": 60,
        "downscale_delay_s": 1,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 1,
    }
    config = app_config(
        tmp_path, max_pending=8, models={"num_cpus": 0.25, "num_gpus": 0, "autoscaling": scaling}
    )
    with cluster(config, ray_dir) as api:
        started = model_replicas()
        assert len(started) == 2

        def scaled_down() -> None:
            wait_until(lambda: len(model_replicas()) == 1, 120, "one model replica")

        answers, during = answers_under_load(api, scaled_down)
        assert model_replicas() < started  # a scale-down: the replica left was there before
    assert during < len(answers)  # requests went on through the scale-down and after it
    assert sum(status == 200 for status, _ in answers) > 0
    assert not lost(answers), lost(answers)
