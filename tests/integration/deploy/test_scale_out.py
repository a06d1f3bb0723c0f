"""Scale-out: the chart's Serve config on a three-node Ray cluster, and a node lost mid-run.

A local multi-node cluster (``ray.cluster_utils.Cluster``) stands in for KubeRay's: a head
with ``num-cpus 0`` and the dashboard, two worker nodes that each offer one
``raytseg_model`` slot, Ray token auth on (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``, as KubeRay's
``authOptions`` sets them). The app is deployed the way KubeRay deploys it: the rendered
``serveConfigV2`` (CI values plus ``values-scale-out.yaml``, adapted to this machine) is PUT
to the dashboard's Serve API. No driver connects: everything goes through HTTP, like the
operator and the clients.

Every node runs on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray's processes
from advertising the machine's other address, which tests may not use).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import nibabel as nib
import pytest

pytest.importorskip("ray.serve")

HERE = Path(__file__).resolve().parent
JOBS = 8
# Fast failure detection (defaults: 5 missed checks of 3 s), so the lost node is noticed
# within seconds, as a test can afford; KubeRay clusters keep Ray's defaults.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
    "metrics_report_interval_ms": 1000,
}


@dataclass
class LocalCluster:
    cluster: Any
    workers: list[Any]
    dashboard: str
    serve_url: str
    token: str
    jobs_dir: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def applications(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=self.auth, timeout=30)
        assert answer.status_code == 200, answer.text
        apps: dict[str, Any] = answer.json()["applications"]
        return apps

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        app = self.applications().get("raytseg")
        if app is None or deployment not in app["deployments"]:
            return []
        replicas: list[dict[str, Any]] = app["deployments"][deployment]["replicas"]
        return replicas

    def running_nodes(self, deployment: str) -> list[str]:
        return [r["node_id"] for r in self.replicas(deployment) if r["state"] == "RUNNING"]


@pytest.fixture(scope="module")
def local_cluster(
    chart: ModuleType,
    merge: Callable[..., dict[str, Any]],
    overrides: Callable[..., dict[str, Any]],
    weights: Path,
    tokens_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    port: Callable[[], int],
    waiter: Callable[..., None],
) -> Iterator[LocalCluster]:
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("Another test left Ray running in this process")
    token = secrets.token_hex(24)
    temp_dir = Path(tempfile.mkdtemp(prefix="rtc", dir="/tmp"))  # short: socket paths are length-limited
    jobs_dir = tmp_path_factory.mktemp("scale-jobs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", token)
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's processes: 127.0.0.1 only
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # ... and this one
        patch.delenv("RAY_ADDRESS", raising=False)
        _reload_ray_auth()
        dashboard_port = port()
        cluster = Cluster(
            initialize_head=True,
            # This fixture shuts the cluster down itself. Ray's exit hooks (an atexit handler
            # and a SIGTERM handler per node) would keep every node, and its GCS client's
            # gRPC threads, alive until the interpreter exits, long after its GCS is gone.
            shutdown_at_exit=False,
            head_node_args={
                "num_cpus": 0,  # as the chart's head: no replicas there
                "node_ip_address": "127.0.0.1",
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
                "temp_dir": str(temp_dir),
                "object_store_memory": 100 * 2**20,
                "_system_config": SYSTEM_CONFIG,
            },
        )
        try:
            workers = [_add_worker(cluster) for _ in range(2)]
            cluster.wait_for_nodes()
            serve_port = port()
            local = LocalCluster(
                cluster,
                workers,
                f"http://127.0.0.1:{dashboard_port}",
                f"http://127.0.0.1:{serve_port}",
                token,
                jobs_dir,
            )
            config = _serve_config(
                chart, merge, overrides(weights, tokens_file, jobs_dir, serve_port), serve_port
            )
            _deploy(local, config, waiter)
            yield local
        finally:
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    _reload_ray_auth()  # back to this process's own settings, for the tests that follow


def _reload_ray_auth() -> None:
    """Make this process read RAY_AUTH_MODE and RAY_AUTH_TOKEN again: Ray caches both at its
    first use, and this process's in-process Ray clients (the cluster's GCS client) must use
    the cluster's token."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _add_worker(cluster: Any) -> Any:
    return cluster.add_node(
        num_cpus=2,
        resources={"raytseg_model": 1},
        node_ip_address="127.0.0.1",
        object_store_memory=150 * 2**20,
    )


def _serve_config(
    chart: ModuleType, merge: Callable[..., Any], local: dict[str, Any], serve_port: int
) -> Any:
    import yaml

    objects = chart.template([chart.CI_VALUES, HERE / "values-scale-out.yaml"])
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    app["args"] = merge(app["args"], local)
    config["http_options"].update(host="127.0.0.1", port=serve_port)  # tests reach 127.0.0.1 only
    return config


def _deploy(local: LocalCluster, config: dict[str, Any], waiter: Callable[..., None]) -> None:
    url = f"{local.dashboard}/api/serve/applications/"
    # Ray's control plane refuses callers without the cluster's token.
    assert httpx.put(url, json=config, timeout=60).status_code == 401
    answer = httpx.put(url, json=config, headers=local.auth, timeout=120)
    assert answer.status_code == 200, answer.text
    waiter(lambda: _ready(local), 240, "the app to be ready")


def _ready(local: LocalCluster) -> bool:
    try:
        return httpx.get(f"{local.serve_url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def small_ct() -> bytes:
    import gzip

    img: Any = nib.load(HERE.parents[2] / "examples" / "data" / "example_ct_sm.nii.gz")
    return gzip.compress(img.slicer[30:70, 30:70, 10:26].to_bytes(), mtime=0)


def test_model_replicas_run_on_different_worker_nodes(
    local_cluster: LocalCluster, small_ct: bytes, token: str, waiter: Callable[..., None]
) -> None:
    head = local_cluster.cluster.head_node.node_id
    workers = {w.node_id for w in local_cluster.workers}
    # /readyz answers once each deployment has a replica; the second one may still be starting.
    waiter(lambda: len(local_cluster.running_nodes("Model297")) == len(workers), 120, "both model replicas")
    model_nodes = local_cluster.running_nodes("Model297")
    assert sorted(model_nodes) == sorted(workers)  # one on each worker
    for name, deployment in local_cluster.applications()["raytseg"]["deployments"].items():
        on_head = [r["node_id"] == head for r in deployment["replicas"]]
        # The chart's ingress replicas run on the head (serve.ingress.on_head); nothing else does.
        assert all(on_head) if name == "Ingress" else not any(on_head), f"{name}: {on_head}"
    with httpx.Client(
        base_url=local_cluster.serve_url, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        answers = [
            client.post("/v1/segment", params={"fast": "true"}, content=small_ct, timeout=300)
            for _ in range(4)
        ]
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.content for a in answers}) == 1


def _job_states(client: httpx.Client, ids: list[str]) -> dict[str, str]:
    """Job states; an answer that fails while the node goes away (a connection error or a
    5xx) is reported as 'unknown'."""
    states = {}
    for job_id in ids:
        try:
            answer = client.get(f"/v1/jobs/{job_id}", timeout=10)
            states[job_id] = answer.json()["state"] if answer.status_code == 200 else "unknown"
        except httpx.HTTPError:
            states[job_id] = "unknown"
    return states


def test_accepted_jobs_survive_a_lost_node(
    local_cluster: LocalCluster, small_ct: bytes, token: str, waiter: Callable[..., None]
) -> None:
    source = local_cluster.jobs_dir / "in" / "ct.nii.gz"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(small_ct)
    # The node to lose: the one running the postprocessing replica, which every job needs last.
    (victim_id,) = local_cluster.running_nodes("Postprocess")
    victim = next(w for w in local_cluster.workers if w.node_id == victim_id)
    head = local_cluster.cluster.head_node.node_id

    with httpx.Client(
        base_url=local_cluster.serve_url, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        ids = []
        for n in range(JOBS):
            body = {"input_uri": str(source), "output_uri": str(local_cluster.jobs_dir / "out" / f"case{n}")}
            answer = client.post("/v1/jobs", json={**body, "options": {"fast": True}}, timeout=60)
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
        waiter(lambda: "running" in _job_states(client, ids).values(), 60, "a job to start")
        local_cluster.cluster.remove_node(victim, allow_graceful=False)  # a node that vanishes
        local_cluster.workers.remove(victim)
        unfinished = [s for s in _job_states(client, ids).values() if s not in ("succeeded", "failed")]
        assert unfinished, "every job finished before the node went away: nothing was tested"

        waiter(
            lambda: set(_job_states(client, ids).values()) <= {"succeeded", "failed"},
            240,
            "every job to finish",
        )
        records = [client.get(f"/v1/jobs/{job_id}", timeout=10).json() for job_id in ids]

    assert [r["state"] for r in records] == ["succeeded"] * JOBS, [r["error"] for r in records]
    outputs = [Path(r["outputs"][0]).read_bytes() for r in records]
    assert len(set(outputs)) == 1  # the same input: whole, identical outputs, nothing half-written
    # The job actor, which holds the records, stayed on the head through it all.
    runner = httpx.get(
        f"{local_cluster.dashboard}/api/v0/actors",
        params={"filter_keys": "class_name", "filter_predicates": "=", "filter_values": "JobRunner"},
        headers=local_cluster.auth,
        timeout=30,
    ).json()["data"]["result"]["result"]
    assert [(a["state"], a["node_id"]) for a in runner] == [("ALIVE", head)]


def test_a_replacement_node_restores_the_replicas(
    local_cluster: LocalCluster, small_ct: bytes, token: str, waiter: Callable[..., None]
) -> None:
    """KubeRay replaces a lost pod; Serve then places the missing model replica on it."""
    local_cluster.workers.append(_add_worker(local_cluster.cluster))
    waiter(lambda: len(set(local_cluster.running_nodes("Model297"))) == 2, 120, "two model replicas again")
    answer = httpx.post(
        f"{local_cluster.serve_url}/v1/segment",
        params={"fast": "true"},
        content=small_ct,
        headers={"Authorization": f"Bearer {token}"},
        timeout=300,
    )
    assert answer.status_code == 200
