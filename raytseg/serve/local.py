"""The service on a Ray started in this process (``raytseg serve``, tests, the benchmark).

On a cluster, Serve is configured by the cluster (KubeRay ``serveConfigV2``); here this
module does what such a config does: start Ray on 127.0.0.1 (no dashboard), start Serve
with the HTTP options (the proxy's own timeout just above the app's, so the app answers
504 first), and deploy ``build_app``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from raytseg.serve.config import ServeConfig

log = logging.getLogger(__name__)
# The proxy's timeout sits this far above the ingress's, which then answers 504 itself.
_PROXY_TIMEOUT_MARGIN_S = 60.0


@dataclass(frozen=True)
class LocalService:
    """Where a locally started service answers."""

    url: str
    metrics_url: str | None  # the node's Prometheus endpoint (Ray metrics agent)
    config: ServeConfig


def start_local(config: ServeConfig, **ray_options: Any) -> LocalService:
    """Start Ray (on 127.0.0.1) and Serve, deploy the app, and wait until it runs.

    ``ray_options`` go to ``ray.init`` (``num_cpus``, ``object_store_memory``...). Without a
    GPU in the local Ray, a config asking for GPU shares is switched to the CPU (with a
    warning) instead of waiting forever for a GPU.
    """
    import ray
    from ray import serve

    from raytseg.serve.app import build_app, required_cpus

    if "num_cpus" not in ray_options:
        ray_options["num_cpus"] = _local_cpus(required_cpus(config))
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _metrics_export_port=config.http.metrics_export_port,
        **ray_options,
    )
    gpus = ray.cluster_resources().get("GPU", 0)  # type: ignore[no-untyped-call]
    if gpus == 0 and any(s.num_gpus > 0 for s in config.model_specs()):
        log.warning("No GPU in the local Ray: running the models on the CPU.")
        config = config.for_cpu_only()
    http = config.http
    serve.start(
        http_options={
            "host": http.host,
            "port": http.port,
            "request_timeout_s": config.request_timeout_s + _PROXY_TIMEOUT_MARGIN_S,
        }
    )
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    return LocalService(f"http://{http.host}:{http.port}", metrics_url(), config)


def drain_local(config: ServeConfig) -> bool:
    """Stop taking requests and jobs, then wait until none is in flight, at most
    ``graceful_shutdown_timeout_s``; False if some were still running then.

    Every ingress replica is told through the app's handle (a call reaches one replica,
    so the calls go on until each has answered that it holds nothing); the job actor
    starts no more jobs and is waited for until its running ones are done.
    """
    import time

    import ray
    from ray import serve

    from raytseg.serve.jobs import job_runner
    from raytseg.serve.runtime import INGRESS

    ingress = serve.get_app_handle(config.app_name)
    replicas, idle = _replica_ids(config.app_name, INGRESS), set[str]()
    runner: Any = job_runner(config.app_name, config.jobs) if config.jobs.enabled else None
    deadline = time.monotonic() + config.shutdown_timeout_s
    while time.monotonic() < deadline:
        replica, held = ingress.drain.remote().result()
        if held == 0:  # for good: a draining replica admits nothing
            idle.add(replica)
        jobs = 0 if runner is None else ray.get(runner.drain.remote())
        if replicas <= idle and jobs == 0:
            time.sleep(1.0)  # the last answers leave the ingress after their slot is released
            return True
        time.sleep(0.2)
    log.warning("Shutting down with requests or jobs still running (graceful_shutdown_timeout_s).")
    return False


def _replica_ids(app: str, deployment: str) -> set[str]:
    """The unique ids of a deployment's running replicas (their actors' names end with them)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"][len(prefix) :] for a in actors if a["name"].startswith(prefix)}


def _local_cpus(required: float) -> int:
    """This machine's cores, or the app's reservation when it asks for more.

    On a cluster a deployment waits for a node with free CPUs; on one machine it would
    wait forever. Replicas mostly wait for each other, so reserving more logical CPUs
    than there are cores only lets them share the cores.
    """
    cores = os.cpu_count() or 1
    if required > cores:
        log.warning("The app reserves %.1f CPUs; this machine has %d: they will be shared.", required, cores)
    return max(cores, math.ceil(required))


def stop_local() -> None:
    """Shut down Serve and the Ray this process started."""
    import ray
    from ray import serve

    try:
        serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()


def metrics_url() -> str | None:
    """This node's metrics endpoint, from Ray's node table (``MetricsExportPort``)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
