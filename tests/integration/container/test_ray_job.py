"""The chart's RayJob run as KubeRay runs it, against S3 (moto) on this machine.

KubeRay makes a RayCluster of the RayJob's ``rayClusterSpec`` and, in the chart's
``SidecarMode``, adds a submitter container to the head pod that waits for the dashboard
and runs ``ray job submit ... -- <entrypoint>`` (rayjob_controller.go, common/job.go). Here
the cluster's containers start as in ``test_ray_cluster.py``; the submitter is a container
in the head's network namespace with KubeRay's command and variables. The batch config is
the chart's ConfigMap, mounted where the chart mounts it; S3 credentials come from the
storage Secret through ``envFrom``.
"""

from __future__ import annotations

import io
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from raytseg.batch.commit import MARKER_NAME
from tests.integration.conftest import free_port
from tests.integration.container.conftest import Docker, Image
from tests.integration.container.test_ray_cluster import (
    NAMESPACE,
    VALUES,
    Cluster,
    docker_network,
    mounted_folders,
    readable,
    ready,
    remove,
    wait_for,
)
from tests.integration.container.test_serve_image import cli_outputs, tiny_ct
from tests.integration.deploy.conftest import merged

BUCKET = "hospital-ct"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
BATCH_VALUES = {  # the RayJob: one CPU worker, the stages sized to share its one CPU
    "batch": {
        "enabled": True,
        "cpuWorkers": {"replicas": 1},
        "job": {
            "input": f"s3://{BUCKET}/in/",
            "output": f"s3://{BUCKET}/out/",
            "fast": True,
            "device": "cpu",
            "model": {"num_gpus": 0, "num_cpus": 0.5},
            "read": {"num_cpus": 0.25},
            "write": {"num_cpus": 0.25},
        },
    },
    "storage": {"existingSecret": "raytseg-s3", "region": "us-east-1"},
}


def submitter_command(job: dict[str, Any], job_id: str) -> str:
    """BuildJobSubmitCommand in SidecarMode: wait for the dashboard's GCS health, then submit
    and follow the job (the container's exit status is the job's)."""
    address = "http://127.0.0.1:8265"
    health = (
        'python -c "import urllib.request; r=urllib.request.urlopen('
        "'http://localhost:8265/api/gcs_healthz', timeout=10); exit(0 if b'success' in r.read() else 1)\""
    )
    wait = f'until {health} >/dev/null 2>&1 ; do echo "Waiting for Ray Dashboard GCS ..." ; sleep 2 ; done ;'
    entrypoint = job["spec"]["entrypoint"].strip()
    return f"{wait} ray job submit --address {address} --submission-id {job_id} -- {entrypoint} ;"


@pytest.fixture(scope="module")
def s3_on_network(docker: Docker) -> Iterator[tuple[str, str, Any]]:
    """A Docker network and moto's S3 on this machine's address there: (network, endpoint, client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with docker_network(docker) as (network, gateway):
        server = ThreadedMotoServer(ip_address=gateway, port=free_port(), verbose=False)
        server.start()
        endpoint = f"http://{gateway}:{server.get_host_and_port()[1]}"
        keys = {name.lower(): value for name, value in S3_KEYS.items()}  # aws_access_key_id=...
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        client.create_bucket(Bucket=BUCKET)
        try:
            yield network, endpoint, client
        finally:
            server.stop()


@pytest.fixture(scope="module")
def job_cluster(
    docker: Docker,
    image: Image,
    chart: ModuleType,
    s3_on_network: tuple[str, str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    network, endpoint, _ = s3_on_network
    values = tmp_path_factory.mktemp("values") / "batch.yaml"
    values.write_text(yaml.safe_dump(merged(BATCH_VALUES, {"storage": {"endpointUrl": endpoint}})))
    objects = chart.template([VALUES, values], namespace=NAMESPACE)
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    (config_map,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-batch")
    ]
    name = f"{job['metadata']['name']}-{uuid.uuid4().hex[:5]}"
    secrets_ = {name: {"auth_token": secrets.token_hex(24)}, "raytseg-s3": S3_KEYS}
    with mounted_folders() as folders:
        batch = folders["raytseg-weights"].parent / "batch-job"
        batch.mkdir()
        for key, text in config_map["data"].items():
            (batch / key).write_text(text)
        folders[config_map["metadata"]["name"]] = batch
        readable(folders)
        cluster = Cluster(
            docker, network, name, job["spec"]["rayClusterSpec"], {}, secrets_, folders, crd="RayJob"
        )
        try:
            yield cluster, job
        finally:
            remove(cluster)


def test_the_rayjob_writes_outputs_and_results_to_the_bucket(
    job_cluster: tuple[Cluster, dict[str, Any]], s3_on_network: tuple[str, str, Any], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    cluster, job = job_cluster
    _, _, s3 = s3_on_network
    ct = tiny_ct()
    s3.put_object(Bucket=BUCKET, Key="in/case1.nii.gz", Body=ct)
    head = cluster.start(cluster.spec["headGroupSpec"])
    (workers,) = cluster.spec["workerGroupSpecs"]
    worker = cluster.start(workers)
    wait_for(cluster, lambda: ready(cluster, head) and ready(cluster, worker), 120, "the pods' readiness")
    job_id = f"{job['metadata']['name']}-{uuid.uuid4().hex[:8]}"
    submitter = f"{head.name}-submitter"
    cluster.docker(
        "run", "-d", f"--name={submitter}", f"--network=container:{head.name}", f"--user={head.user}",
        "--entrypoint=/bin/bash", "--env=PYTHONUNBUFFERED=1",
        f"--env=RAY_DASHBOARD_ADDRESS={cluster.name}-head-svc.{NAMESPACE}.svc.cluster.local:8265",
        f"--env=RAY_JOB_SUBMISSION_ID={job_id}",
        "--env=RAY_AUTH_MODE=token", f"--env=RAY_AUTH_TOKEN={cluster.ray_token}",
        head.image, "-ec", "--", submitter_command(job, job_id),
    )  # fmt: skip
    cluster.stopped.append(submitter)  # removed with the cluster
    started = time.monotonic()
    status = cluster.docker("wait", submitter, timeout=600)
    print(f"\nRayJob submitted and finished in {time.monotonic() - started:.1f} s")
    assert status == "0", cluster.docker.logs(submitter)
    record = httpx.get(
        f"{cluster.url('dashboard')}/api/jobs/{job_id}", headers=cluster.ray_auth, timeout=30
    ).json()
    assert record["status"] == "SUCCEEDED", record

    written = {
        o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]
    }
    rows = pq.read_table(io.BytesIO(written.pop("out/_results.parquet"))).to_pylist()
    assert [(r["id"], r["status"]) for r in rows] == [("case1", "ok")], rows
    assert written.pop(f"out/case1/{MARKER_NAME}")  # the item's completion marker
    folder = cli_outputs(ct, cluster.folders["raytseg-weights"], tmp_path)
    expected = {
        f"out/case1/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in folder.rglob("*.nii.gz")
    }
    assert sorted(written) == sorted(expected)
    assert [k for k in expected if written[k] != expected[k]] == []
