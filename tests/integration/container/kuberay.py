"""What KubeRay makes of the pod templates of a rendered RayService or RayJob.

KubeRay (>= 1.7; ray-operator/controllers/ray/common/pod.go) does not run the image's
command: it writes ``ulimit -n ...; ray start ...`` from the group's ``rayStartParams`` and the
container's resource limits, adds variables (the head's address, the Ray token, Serve's
timeouts...), a memory-backed /dev/shm, and liveness/readiness probes. This module does the
same for the settings the chart uses (token auth, in-tree autoscaling v2 or none, no TLS, no
GCS fault tolerance), so that containers start as KubeRay would start them. Left out: the autoscaler
sidecar (it drives the Kubernetes API) and the ``wait-gcs-ready`` init container (the test
starts workers once the head answers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

AGENT_PORT = 52365  # utils.DefaultDashboardAgentListenPort, set on every node
WGET = "wget --tries 1 -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"


@dataclass(frozen=True)
class Probe:
    """A Kubernetes probe: a command run in the container, or an HTTP GET on its address."""

    command: list[str] | None
    http: tuple[int, str] | None  # (port, path)
    initial_delay_s: int
    period_s: int
    timeout_s: int
    failure_threshold: int


@dataclass(frozen=True)
class RayPod:
    name: str
    head: bool
    image: str
    command: list[str]
    env: dict[str, str]
    ports: dict[str, int]
    user: str  # uid:gid
    cpus: float
    memory_bytes: int
    mounts: list[dict[str, Any]]  # the container's volumeMounts
    labels: dict[str, str]  # the template's and KubeRay's (what PodMonitors select on)
    liveness: Probe
    readiness: Probe


def quantity(text: str | int) -> float:
    """A Kubernetes quantity: "500m" -> 0.5, "3Gi" -> 3 * 2**30."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()  # type: ignore[union-attr]
    return float(number) * units.get(unit, 1)


def _start_params(group: dict[str, Any], pod: Identity) -> dict[str, str]:
    """setMissingRayStartParams and generateRayStartCommand's additions (num-cpus, memory)."""
    params = {k: str(v) for k, v in group["rayStartParams"].items()}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    if pod.head:
        params.setdefault("dashboard-host", "0.0.0.0")
        if pod.autoscaling:
            params["no-monitor"] = "true"  # the autoscaler sidecar monitors instead
    else:
        params.setdefault("address", f"{pod.head_fqdn}:6379")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
    params.setdefault("num-cpus", str(int(quantity(limits["cpu"]))))
    params.setdefault("memory", str(int(quantity(limits["memory"]))))
    return params


def ray_start_command(params: dict[str, str], head: bool) -> str:
    """convertParamMap: sorted flags, "true" as a bare switch, "false" left out."""
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() == "true":
            flags.append(f" --{key} ")
        elif value.lower() != "false":
            flags.append(f" --{key}={value} ")
    return ("ray start --head " if head else "ray start ") + "".join(flags)


Secrets = dict[str, dict[str, str]]  # Secret name -> key -> value


@dataclass(frozen=True)
class Identity:
    """Which pod: what the kubelet resolves ``fieldRef`` variables from."""

    cluster: str
    namespace: str
    name: str
    group: str  # "headgroup" for the head
    autoscaling: bool  # the cluster's enableInTreeAutoscaling (the chart's: autoscaler v2)

    @property
    def head(self) -> bool:
        return self.group == "headgroup"

    @property
    def head_fqdn(self) -> str:
        return f"{self.cluster}-head-svc.{self.namespace}.svc.cluster.local"

    def field(self, path: str) -> str:
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.labels['ray.io/cluster']": self.cluster,
            "metadata.labels['ray.io/group']": self.group,
        }
        return fields[path]


def _env(container: dict[str, Any], pod: Identity, secrets: Secrets) -> dict[str, str]:
    """The template's variables, with fieldRef and secretKeyRef resolved as the kubelet does."""
    env = {}
    for source in container.get("envFrom", []):  # every key of a Secret, as variables
        env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[item["name"]] = pod.field(item["valueFrom"]["fieldRef"]["fieldPath"])
    return env


def _probes(head: bool, crd: str, serve_port: int) -> tuple[Probe, Probe]:
    """initLivenessAndReadinessProbe for Ray >= 2.53: GET /api/healthz on the agent; a
    RayService worker's readiness also asks its Serve proxy, with one failure allowed."""
    timeout = 5 if head else 2
    liveness = Probe(None, (AGENT_PORT, "/api/healthz"), 30, 5, timeout, 120)
    if head or crd != "RayService":
        return liveness, Probe(None, (AGENT_PORT, "/api/healthz"), 10, 5, timeout, 10)
    checks = [
        WGET.format(timeout=2, port=AGENT_PORT, path="api/local_raylet_healthz"),
        WGET.format(timeout=10, port=serve_port, path="-/healthz"),
    ]
    return liveness, Probe(["bash", "-c", " && ".join(checks)], None, 10, 5, timeout, 1)


def ray_pod(identity: Identity, group: dict[str, Any], secrets: Secrets, crd: str = "RayService") -> RayPod:
    """The pod KubeRay builds for the head group or a worker group of a RayService or RayJob."""
    params = _start_params(group, identity)
    start = ray_start_command(params, identity.head)
    spec = group["template"]["spec"]
    container = spec["containers"][0]
    env = {**_env(container, identity, secrets), **_kuberay_env(identity, start, secrets, crd)}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    security = spec["securityContext"]
    limits = container["resources"]["limits"]
    liveness, readiness = _probes(identity.head, crd, ports.get("serve", 8000))
    return RayPod(
        name=identity.name,
        head=identity.head,
        image=container["image"],
        command=["/bin/bash", "-c", "--", f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"],
        env=env,
        ports=ports,
        user=f"{security['runAsUser']}:{security['runAsGroup']}",
        cpus=quantity(limits["cpu"]),
        memory_bytes=int(quantity(limits["memory"])),
        mounts=container.get("volumeMounts", []),
        labels=_labels(identity, group),
        liveness=liveness,
        readiness=readiness,
    )


def _labels(pod: Identity, group: dict[str, Any]) -> dict[str, str]:
    """labelPod: the template's labels and KubeRay's own."""
    return {
        **group["template"]["metadata"].get("labels", {}),
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": pod.cluster,
        "ray.io/node-type": "head" if pod.head else "worker",
        "ray.io/group": pod.group,
    }


def _kuberay_env(pod: Identity, start: str, secrets: Secrets, crd: str) -> dict[str, str]:
    """setContainerEnvVars, SetContainerTokenAuthEnvVars, autoscaler v2."""
    ip = "127.0.0.1" if pod.head else pod.head_fqdn
    env = {} if pod.head else {"FQ_RAY_IP": pod.head_fqdn, "RAY_IP": pod.head_fqdn.split(".")[0]}
    env.update(
        RAY_CLUSTER_NAME=pod.cluster,
        RAY_CLUSTER_NAMESPACE=pod.namespace,
        RAY_CLOUD_INSTANCE_ID=pod.name,
        RAY_NODE_TYPE_NAME=pod.group,
        KUBERAY_GEN_RAY_START_CMD=start,
        RAY_PORT="6379",
        RAY_ADDRESS=f"{ip}:6379",
        RAY_USAGE_STATS_KUBERAY_IN_USE="1",
        RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE="1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets[pod.cluster]["auth_token"],  # the Secret KubeRay makes per cluster
    )
    if crd == "RayService":  # "to improve service SLA"
        env.update(
            RAY_timeout_ms_task_wait_for_death_info="0",
            RAY_gcs_server_request_timeout_seconds="5",
            RAY_SERVE_KV_TIMEOUT_S="5",
        )
    if pod.head:
        env["RAY_USAGE_STATS_EXTRA_TAGS"] = f"kuberay_version=nightly;kuberay_crd={crd}"
    if pod.head and pod.autoscaling:
        env["RAY_ENABLE_AUTOSCALER_V2"] = "true"
    return env
