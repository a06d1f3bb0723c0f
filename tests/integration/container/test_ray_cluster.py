"""A Ray cluster of raytseg containers, started as KubeRay starts the chart's RayService.

The chart is rendered with ``values-containers.yaml``; each container gets what KubeRay
would give its pod (``kuberay.py``): the generated ``ray start`` command, the template's and
KubeRay's variables, ports, user, CPU and memory limits, volumes (emptyDir as tmpfs, the
API-token Secret and the weights claim as read-only folders) and probes. The containers
share a Docker network on which the head answers to its Service's name, as pods reach
``<cluster>-head-svc``. The app is deployed as KubeRay deploys it: the rendered
``serveConfigV2`` PUT to the head's dashboard with the cluster's Ray token. Clients use the
head's Serve port, the address KubeRay's serve Service points at.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import wait_until
from tests.integration.conftest import prometheus_server
from tests.integration.container.conftest import Docker, Image, make_readable
from tests.integration.container.kuberay import Identity, Probe, RayPod, quantity, ray_pod
from tests.integration.container.test_serve_image import cli_segmentation, tiny_ct

VALUES = Path(__file__).resolve().parent / "values-containers.yaml"
NAMESPACE = "raytseg"
API_TOKEN = "container-cluster-api-token-0123456789"


@dataclass
class Cluster:
    docker: Docker
    network: str
    name: str  # the RayCluster's, as KubeRay names the one a RayService owns
    spec: dict[str, Any]  # rayClusterConfig
    serve_config: dict[str, Any]
    secrets: dict[str, dict[str, str]]
    folders: dict[str, Path]  # Secret, ConfigMap and claim names -> what this machine mounts
    crd: str = "RayService"  # what owns the cluster: a RayService or a RayJob
    pods: dict[str, RayPod] = field(default_factory=dict)  # the live ones
    # containers that no longer serve (killed pods, a finished submitter): removed at the end
    stopped: list[str] = field(default_factory=list)

    def start(self, group: dict[str, Any]) -> RayPod:
        kind = group.get("groupName", "headgroup")
        suffix = "head" if kind == "headgroup" else f"{kind}-worker-{uuid.uuid4().hex[:5]}"
        autoscaling = bool(self.spec.get("enableInTreeAutoscaling"))
        identity = Identity(self.name, NAMESPACE, f"{self.name}-{suffix}", kind, autoscaling)
        pod = ray_pod(identity, group, self.secrets, self.crd)
        self.docker("run", "-d", *self._run_args(pod, group), pod.image, *pod.command[1:])
        self.pods[pod.name] = pod
        return pod

    def kill(self, pod: RayPod) -> None:
        """The pod vanishes (node loss, OOM kill): SIGKILL, nothing shut down."""
        self.docker("kill", pod.name)
        del self.pods[pod.name]
        self.stopped.append(pod.name)

    def _run_args(self, pod: RayPod, group: dict[str, Any]) -> list[str]:
        args = [
            f"--name={pod.name}",
            f"--hostname={pod.name}",
            f"--network={self.network}",
            f"--user={pod.user}",
            "--group-add=100",  # fsGroup
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            f"--cpus={pod.cpus}",
            f"--memory={pod.memory_bytes}",
            f"--shm-size={pod.memory_bytes}",  # KubeRay's /dev/shm: memory-backed, the memory limit
            f"--entrypoint={pod.command[0]}",
            # No --ulimit: this machine caps open files at 20000, so the command's `ulimit -n
            # 65536` fails (a warning; `ray start` runs on) where a node's containerd allows it.
        ]
        if pod.head:  # the head Service's names
            fqdn = f"{self.name}-head-svc.{NAMESPACE}.svc.cluster.local"
            args += [f"--network-alias={fqdn}", f"--network-alias={self.name}-head-svc"]
        args += [f"--env={k}={v}" for k, v in pod.env.items()]
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        return args + [self._mount(m, volumes[m["name"]]) for m in pod.mounts]

    def _mount(self, mount: dict[str, Any], volume: dict[str, Any]) -> str:
        path = mount["mountPath"]
        if "emptyDir" in volume:
            size = int(quantity(volume["emptyDir"].get("sizeLimit", "1Gi")))
            return f"--tmpfs={path}:rw,uid=1000,gid=100,mode=1770,size={size}"
        names = (volume.get("secret", {}).get("secretName"), volume.get("configMap", {}).get("name"))
        source = next((n for n in names if n), None) or volume["persistentVolumeClaim"]["claimName"]
        return f"--volume={self.folders[source]}:{path}:ro"

    def ip(self, pod: RayPod) -> str:
        fmt = f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}'
        return self.docker("inspect", "--format", fmt, pod.name)

    @property
    def head(self) -> RayPod:
        return next(p for p in self.pods.values() if p.head)

    @property
    def ray_token(self) -> str:
        """The cluster's Ray token (the Secret KubeRay makes for a cluster with token auth)."""
        return self.secrets[self.name]["auth_token"]

    @property
    def ray_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ray_token}"}

    def url(self, port_name: str) -> str:
        return f"http://{self.ip(self.head)}:{self.head.ports[port_name]}"


def probe_passes(cluster: Cluster, pod: RayPod, probe: Probe) -> bool:
    """One probe, as the kubelet runs it: the command in the container, or a GET of its IP."""
    if probe.command is not None:
        done = subprocess.run(
            ["docker", "exec", pod.name, *probe.command],
            env=cluster.docker.env,
            capture_output=True,
            timeout=probe.timeout_s + 10,
        )
        return done.returncode == 0
    port, path = probe.http  # type: ignore[misc]
    try:
        answer = httpx.get(f"http://{cluster.ip(pod)}:{port}{path}", timeout=probe.timeout_s)
    except httpx.HTTPError:
        return False
    return 200 <= answer.status_code < 400


def deploy(cluster: Cluster) -> None:
    """KubeRay's RayService controller: PUT the Serve config to the head's dashboard."""
    url = f"{cluster.url('dashboard')}/api/serve/applications/"
    answer = httpx.put(url, json=cluster.serve_config, headers=cluster.ray_auth, timeout=120)
    assert answer.status_code == 200, answer.text


def app_status(cluster: Cluster) -> dict[str, Any]:
    """Serve's view of the app (the dashboard's API, as KubeRay polls it); {} when unreachable."""
    try:
        url = f"{cluster.url('dashboard')}/api/serve/applications/"
        answer = httpx.get(url, headers=cluster.ray_auth, timeout=10)
        app: dict[str, Any] = answer.json()["applications"].get("raytseg", {})
    except (httpx.HTTPError, ValueError):
        return {}
    return app


def app_running(cluster: Cluster) -> bool:
    return app_status(cluster).get("status") == "RUNNING"


def diagnosis(cluster: Cluster) -> str:
    """The app's state and each container's last log lines, for a failed wait."""
    app = app_status(cluster)
    deployments = app.get("deployments", {})
    states = {name: (d["status"], d.get("message", "")[-1000:]) for name, d in deployments.items()}
    logs = [f"--- {name}\n{cluster.docker.logs(name)[-1500:]}" for name in cluster.pods]
    return f"app {app.get('status')}: {app.get('message', '')[-3000:]}\n{states}\n" + "\n".join(logs)


def wait_for(cluster: Cluster, check: Callable[[], bool], timeout_s: float, what: str) -> None:
    try:
        wait_until(check, timeout_s, what)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnosis(cluster)}") from None


@contextmanager
def docker_network(docker: Docker) -> Iterator[tuple[str, str]]:
    """A bridge network for one cluster: its name and this machine's address on it."""
    name = f"raytseg-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    try:
        yield name, docker("network", "inspect", "--format", "{{(index .IPAM.Config 0).Gateway}}", name)
    finally:
        subprocess.run(["docker", "network", "rm", name], env=docker.env, capture_output=True, timeout=60)


@contextmanager
def mounted_folders() -> Iterator[dict[str, Path]]:
    """The folders mounted for the chart's volumes: the API tokens Secret and the weights
    claim (the fast total model, random weights). Others may be added; all readable by uid
    1000 once ``readable`` ran."""
    from raytseg.weights.synth import synthesize_task

    root = Path(tempfile.mkdtemp(prefix="raytseg-cluster-", dir="/tmp"))
    try:
        synthesize_task("total", root / "weights", fast=True, tiny=True)
        (root / "api-tokens").mkdir()
        (root / "api-tokens" / "tokens").write_text(f"{API_TOKEN}\n")
        yield {"raytseg-api-tokens": root / "api-tokens", "raytseg-weights": root / "weights"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def readable(folders: dict[str, Path]) -> None:
    for root in {folder.parent for folder in folders.values()}:
        make_readable(root)


def remove(cluster: Cluster) -> None:
    for name in [*cluster.pods, *cluster.stopped]:
        subprocess.run(["docker", "rm", "-f", name], env=cluster.docker.env, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(docker: Docker, image: Image, chart: ModuleType) -> Iterator[Cluster]:
    (service,) = [o for o in chart.template([VALUES], namespace=NAMESPACE) if o["kind"] == "RayService"]
    spec = service["spec"]["rayClusterConfig"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == image.tag
    name = f"{service['metadata']['name']}-{uuid.uuid4().hex[:5]}"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    token = {name: {"auth_token": secrets.token_hex(24)}}
    with docker_network(docker) as (network, _), mounted_folders() as folders:
        readable(folders)
        state = Cluster(docker, network, name, spec, serve_config, token, folders)
        try:
            yield state
        finally:
            remove(state)


@pytest.fixture(scope="module")
def running(cluster: Cluster) -> Cluster:
    """One head (num-cpus 0) and two CPU workers, the app deployed and every pod ready."""
    (workers,) = cluster.spec["workerGroupSpecs"]
    head = cluster.start(cluster.spec["headGroupSpec"])
    assert head.command[3].startswith("ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start --head ")
    assert " --num-cpus=0 " in head.command[3]
    wait_for(cluster, lambda: ready(cluster, head), 120, "the head's readiness probe")
    pods = [cluster.start(workers) for _ in range(workers["replicas"])]
    deploy(cluster)
    wait_for(cluster, lambda: app_running(cluster), 300, "the Serve app to run")
    wait_for(cluster, lambda: all(ready(cluster, pod) for pod in pods), 120, "the workers' readiness probes")
    return cluster


def ready(cluster: Cluster, pod: RayPod) -> bool:
    return probe_passes(cluster, pod, pod.readiness)


def segment(cluster: Cluster, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{cluster.url('serve')}/v1/segment",
        params={"fast": "true"},
        content=body,
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=300,
    )


def test_every_probe_passes_and_the_head_serves_the_clis_masks(running: Cluster, tmp_path: Path) -> None:
    for pod in running.pods.values():
        assert probe_passes(running, pod, pod.liveness), f"{pod.name}: liveness"
        assert probe_passes(running, pod, pod.readiness), f"{pod.name}: readiness"
    ct = tiny_ct()
    answer = segment(running, ct)
    assert answer.status_code == 200, answer.text
    assert answer.content == cli_segmentation(ct, running.folders["raytseg-weights"], tmp_path)


@dataclass
class Load:
    """Clients sending segmentations one after another until stopped; every outcome kept."""

    cluster: Cluster
    body: bytes
    outcomes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # bodies of the 5xx without Retry-After
    stop: threading.Event = field(default_factory=threading.Event)

    def recovered_since(self, count: int) -> bool:
        """Four answers in a row, all 200, each after the first ``count``."""
        return len(self.outcomes) >= count + 4 and self.outcomes[-4:] == ["200"] * 4

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                answer = segment(self.cluster, self.body)
                retry = "+Retry-After" if answer.headers.get("Retry-After") else ""
                self.outcomes.append(f"{answer.status_code}{retry}")
                if answer.status_code >= 500 and not retry:
                    self.errors.append(answer.text[:500])
            except httpx.HTTPError as error:
                self.outcomes.append(type(error).__name__)


def test_a_killed_worker_is_replaced_under_load(running: Cluster) -> None:
    ingress = app_status(running)["deployments"]["Ingress"]["replicas"]
    assert {replica["node_ip"] for replica in ingress} == {running.ip(running.head)}  # on_head
    load = Load(running, tiny_ct())
    clients = [threading.Thread(target=load.run) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: len(load.outcomes) >= 4, 120, "answers before the loss")
        victim = next(p for p in running.pods.values() if not p.head)
        running.kill(victim)
        lost_at = time.monotonic()
        (workers,) = running.spec["workerGroupSpecs"]
        replacement = running.start(workers)  # KubeRay creates a new pod for the group
        wait_for(running, lambda: ready(running, replacement), 300, "the new pod's readiness")
        print(f"\nworker lost -> replacement ready: {time.monotonic() - lost_at:.1f} s")
        done = len(load.outcomes)
        wait_until(lambda: load.recovered_since(done), 120, "4 answers of 200 in a row after it")
    finally:
        load.stop.set()
        for client in clients:
            client.join(timeout=330)
    counts = Counter(load.outcomes)
    print(f"outcomes: {dict(counts)}")
    # Nothing lost: the ingress replicas are on the head, so each request in flight is still
    # held by its replica; those whose later stages were on the lost pod get 503 + Retry-After.
    assert set(counts) <= {"200", "503+Retry-After"}, (counts, load.errors)


def _meta_labels(cluster: Cluster, pod: RayPod) -> dict[str, str]:
    """What Prometheus's Kubernetes discovery says of a pod, as static target labels."""
    labels = {
        f"__meta_kubernetes_pod_label_{re.sub(r'[^A-Za-z0-9_]', '_', k)}": v for k, v in pod.labels.items()
    }
    return {
        **labels,
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": pod.name,
        "__meta_kubernetes_pod_container_name": "ray-head" if pod.head else "ray-worker",
    }


def scrape_configs(cluster: Cluster, monitor: dict[str, Any]) -> list[dict[str, Any]]:
    """The scrape jobs prometheus-operator generates for a PodMonitor, over the live pods."""
    spec = monitor["spec"]
    selected = [
        p for p in cluster.pods.values() if spec["selector"]["matchLabels"].items() <= p.labels.items()
    ]
    job_label = re.sub(r"[^A-Za-z0-9_]", "_", spec["jobLabel"])
    jobs = []
    for index, endpoint in enumerate(spec["podMetricsEndpoints"]):
        targets = [
            {
                "targets": [f"{cluster.ip(pod)}:{pod.ports[endpoint['port']]}"],
                "labels": _meta_labels(cluster, pod),
            }
            for pod in selected
            if endpoint["port"] in pod.ports
        ]
        operator = [  # namespace, container, pod, job (from jobLabel), endpoint (the port's name)
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": [f"__meta_kubernetes_pod_label_{job_label}"], "target_label": "job"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
        ]
        own = [
            {
                "action": r.get("action", "replace"),
                "source_labels": r["sourceLabels"],
                "target_label": r["targetLabel"],
            }
            for r in endpoint.get("relabelings", [])
        ]
        jobs.append(
            {
                "job_name": f"podMonitor/{NAMESPACE}/{monitor['metadata']['name']}/{index}",
                "scrape_interval": endpoint.get("interval", "30s"),
                "metrics_path": endpoint.get("path", "/metrics"),
                "static_configs": targets,
                "relabel_configs": operator + own,
            }
        )
    return jobs


def _seconds(duration: str) -> float:
    """A Prometheus duration of seconds or minutes ("5s", "1m") in seconds."""
    return float(duration[:-1]) * {"s": 1, "m": 60}[duration[-1]]


def test_prometheus_scrapes_the_pods_as_the_podmonitors_say(
    running: Cluster, chart: ModuleType, prometheus_binary: str, tmp_path: Path
) -> None:
    from tests.integration.deploy.test_observability import PANELS_WITH_DATA, VARIABLES, substitute

    refused = segment(running, b"junk" * 100)  # the error panels' data
    assert refused.status_code == 400, refused.text
    monitors = [o for o in chart.template([VALUES], namespace=NAMESPACE) if o["kind"] == "PodMonitor"]
    config = {"scrape_configs": [job for m in monitors for job in scrape_configs(running, m)]}
    with prometheus_server(prometheus_binary, config, tmp_path) as prometheus:
        up = f'up{{namespace="{NAMESPACE}", ray_io_cluster="{running.name}", endpoint="metrics"}}'
        wait_until(lambda: sum(float(s["value"][1]) for s in prometheus.query(up)) == 3, 60, "3 pods up")
        requests = f'sum(ray_raytseg_requests_total{{ray_io_cluster="{running.name}"}})'
        wait_until(lambda: prometheus.value(requests) >= 2, 60, "raytseg's counter")
        interval = max(_seconds(job["scrape_interval"]) for job in config["scrape_configs"])
        time.sleep(2 * interval + 1)  # two more scrapes: rate() over the dashboard's 1m has two points
        variables = {**VARIABLES, "$cluster": running.name}
        dashboard = json.loads(chart.DASHBOARD.read_text())
        panels = [p for p in dashboard["panels"] if p["title"] in PANELS_WITH_DATA]
        empty = [
            p["title"]
            for p in panels
            if not any(prometheus.query(substitute(t["expr"], variables)) for t in p["targets"])
        ]
    assert len(panels) == len(PANELS_WITH_DATA)
    assert not empty, f"panels without data: {empty}"
