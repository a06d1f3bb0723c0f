"""``ServeConfig``: everything the online service is configured by, validated once.

Sources, later ones winning (nested mappings are merged key by key)::

    defaults  <  YAML file  <  app builder args  <  RAYTSEG_SERVE__* environment variables

- the YAML file is ``config_file`` in the builder args (``serve run``/``serveConfigV2``
  ``args: {config_file: /etc/raytseg/serve.yaml}``), ``raytseg serve --config FILE``, or
  the ``RAYTSEG_SERVE_CONFIG`` variable;
- an environment variable names a nested key with ``__``:
  ``RAYTSEG_SERVE__LIMITS__MAX_BODY_BYTES=200000000``; its value is read as YAML, so
  ``true``, ``8`` and ``[a, b]`` are typed.

Unknown keys are rejected everywhere. API tokens are never part of the config (it is
visible in ``serve build`` output and the Ray dashboard): the ingress reads them at start
from the variable and the mounted file that ``auth`` names.

Example (YAML)::

    device: gpu
    tasks:
      total: {modes: [default, fast]}
      lung_vessels: {dedicated: false}      # served by the shared multiplexed pool
    models: {num_gpus: 0.25, autoscaling: {min_replicas: 1, max_replicas: 4}}
    limits: {max_body_bytes: 500000000, max_queued_requests: 16}
    auth: {token_file: /var/run/secrets/raytseg/tokens}
    jobs: {allowed_prefixes: ["s3://hospital-ct/in/", "s3://hospital-ct/out/"]}

This module imports neither Ray nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytseg import configfile
from raytseg.config import DEFAULT_MAX_VOXELS, Backend, Device, check_backend
from raytseg.configfile import Strict
from raytseg.errors import RaytsegError
from raytseg.tasks import get_task

Mode = Literal["default", "fast", "fastest"]
ENV_PREFIX = "RAYTSEG_SERVE__"
CONFIG_FILE_ENV = "RAYTSEG_SERVE_CONFIG"
_GIB = 1024**3


class AutoscalingSpec(Strict):
    """Ray Serve ``autoscaling_config`` for one deployment (replicas follow ongoing requests)."""

    min_replicas: int = Field(default=1, ge=0, description="Never fewer replicas (0: scale to zero).")
    max_replicas: int = Field(default=1, ge=1, description="Never more replicas.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(default=1.0, gt=0, description="Per replica, queued + running.")
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Sustained load before adding.")
    downscale_delay_s: float = Field(
        default=900.0, ge=0, description="Idle time before removing; long, because loading is slow."
    )
    look_back_period_s: float = Field(default=30.0, gt=0, description="Window the load is averaged over.")
    metrics_interval_s: float = Field(default=10.0, gt=0, description="How often replicas report load.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class StageSpec(Strict):
    """Resources and queueing of one CPU deployment (preprocess or postprocess)."""

    num_cpus: float = Field(default=1.0, ge=0, description="Ray logical CPUs per replica.")
    memory_gb: float | None = Field(default=None, gt=0, description="Ray memory reservation per replica.")
    max_ongoing_requests: int = Field(default=2, ge=1, description="Calls one replica runs at once.")
    max_queued_requests: int = Field(
        default=64, ge=1, description="Calls each caller queues for this deployment before refusing."
    )
    autoscaling: AutoscalingSpec = AutoscalingSpec(max_replicas=4)


class ModelDeploymentSpec(StageSpec):
    """Resources of a model deployment: one network resident per replica."""

    num_gpus: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="GPU share per replica; several replicas share one GPU. Ray does not isolate "
        "GPU memory: keep the sum of the models' peak memory under the GPU's.",
    )
    max_ongoing_requests: int = Field(default=1, ge=1, le=8, description="Volumes one replica runs at once.")
    max_queued_requests: int = Field(default=32, ge=1, description="Volumes each caller queues.")
    autoscaling: AutoscalingSpec = AutoscalingSpec(max_replicas=2)
    backend: Backend = Field(
        default="auto", description="What runs the networks: torch, openvino (device cpu only) or auto."
    )
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)


class PoolSpec(ModelDeploymentSpec):
    """The multiplexed deployment serving every model without a deployment of its own."""

    enabled: bool = Field(default=True, description="Route non-dedicated models here (else refuse them).")
    max_models_per_replica: int = Field(default=3, ge=1, description="LRU size of resident networks.")


class TaskEntry(Strict):
    """One task the service accepts."""

    modes: tuple[Mode, ...] = Field(default=("default",), min_length=1, description="Resolutions offered.")
    dedicated: bool = Field(
        default=True, description="Its models get deployments of their own; false: the shared pool."
    )
    model: ModelDeploymentSpec | None = Field(default=None, description="Overrides `models` for it.")


class IngressSpec(Strict):
    """The HTTP deployment: cheap, asynchronous, holds no arrays."""

    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    max_ongoing_requests: int = Field(
        default=64, ge=2, description="HTTP requests one replica holds (segmentations wait here)."
    )
    on_head: bool = Field(
        default=False,
        description=(
            "Place the replicas on Ray's head node. A request in flight is held by its ingress "
            "replica, so a worker node lost under load then costs no request: each ends 200, or "
            "503 with Retry-After. The head must offer num_cpus (a head started with num-cpus 0, "
            "as the chart's, needs num_cpus: 0; the ingress only awaits the other deployments)."
        ),
    )


class LimitsSpec(Strict):
    """What one request may cost, and when the service says 'come back later'."""

    max_body_bytes: int = Field(default=_GIB, gt=0, description="Largest upload (413 beyond).")
    max_voxels: int = Field(default=DEFAULT_MAX_VOXELS, gt=0, description="Largest image (413 beyond).")
    max_archive_bytes: int = Field(default=4 * _GIB, gt=0, description="Largest unpacked DICOM zip.")
    max_queued_requests: int = Field(
        default=16,
        ge=1,
        description=(
            "Segmentations the app holds at once; more get 503/429. Each of the ingress.num_replicas "
            "replicas holds its share (the integer part of this divided by their number)."
        ),
    )
    overload_status: Literal[503, 429] = Field(default=503, description="Status of refused requests.")
    retry_after_s: int = Field(default=30, ge=0, description="Retry-After sent with 503/429.")


class AuthSpec(Strict):
    """Where the ingress finds API tokens (never in this config)."""

    token_env: str = Field(default="RAYTSEG_API_TOKENS", description="Variable with comma-separated tokens.")
    token_file: Path | None = Field(default=None, description="Mounted secret: one token per line.")
    required: bool = Field(default=False, description="Refuse to start without any token.")


class JobsSpec(Strict):
    """The asynchronous job API (inputs and outputs through fsspec)."""

    enabled: bool = True
    allowed_prefixes: tuple[str, ...] = Field(
        default=(), description="Job URIs must lie under one of these (empty: every URI is refused)."
    )
    max_running: int = Field(default=2, ge=1, description="Jobs segmented at once.")
    max_pending: int = Field(default=256, ge=1, description="Jobs waiting; more get 503/429.")
    keep_finished: int = Field(default=10_000, ge=1, description="Finished jobs remembered (oldest go).")
    namespace: str = Field(default="raytseg", description="Ray namespace of the job actor.")
    store: str | None = Field(
        default=None,
        description=(
            "Folder or URI prefix (e.g. s3://bucket/raytseg-jobs) where job records are kept: "
            "they survive the job actor, the ingress and the cluster, and unfinished jobs run "
            "again after a restart. Empty: in the job actor's memory only."
        ),
    )

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes_absolute(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in prefixes:
            _check_absolute(prefix, "allowed prefix")
        return prefixes

    @field_validator("store")
    @classmethod
    def _store_absolute(cls, store: str | None) -> str | None:
        if store:
            _check_absolute(store, "jobs.store")
        return store or None

    @model_validator(mode="after")
    def _store_apart(self) -> JobsSpec:
        """Jobs must not write over the records: the store lies outside every allowed prefix."""
        if self.store is not None:
            store = self.store.rstrip("/") + "/"
            for prefix in self.allowed_prefixes:
                other = prefix.rstrip("/") + "/"
                if store.startswith(other) or other.startswith(store):
                    raise ValueError(f"jobs.store {self.store!r} overlaps the allowed prefix {prefix!r}")
        return self


def _check_absolute(location: str, what: str) -> None:
    if "://" not in location and not location.startswith("/"):
        raise ValueError(f"{what} {location!r} must be an absolute path or a URI")


class HttpSpec(Strict):
    """Used by ``raytseg serve`` when it starts Ray itself (a cluster sets these in its own config)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    metrics_export_port: int | None = Field(
        default=None, ge=1, le=65535, description="Ray metrics agent port (KubeRay uses 8080)."
    )


class ServeConfig(Strict):
    """The online service's configuration; see the module docstring for sources."""

    app_name: str = "raytseg"
    device: Device = Field(default="gpu", description="The model replicas' device: cpu, gpu or gpu:N.")
    torch_threads: int | None = Field(
        default=None, ge=1, description="Torch threads per model replica (default: all cores on CPU)."
    )
    weights: str | None = Field(
        default=None, description="Weights folder or URI; default: RAYTSEG_WEIGHTS in the replicas."
    )
    tasks: dict[str, TaskEntry] = Field(
        default_factory=lambda: {"total": TaskEntry(modes=("default", "fast"))}, min_length=1
    )
    models: ModelDeploymentSpec = ModelDeploymentSpec()
    pool: PoolSpec = PoolSpec()
    ingress: IngressSpec = IngressSpec()
    preprocess: StageSpec = StageSpec()
    postprocess: StageSpec = StageSpec()
    limits: LimitsSpec = LimitsSpec()
    auth: AuthSpec = AuthSpec()
    jobs: JobsSpec = JobsSpec()
    http: HttpSpec = HttpSpec()
    request_timeout_s: float = Field(default=1800.0, gt=0, description="504 after this long.")
    graceful_shutdown_timeout_s: float | None = Field(
        default=None, gt=0, description="Drain time of a stopping replica; default request_timeout_s + 120."
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, TaskEntry]) -> dict[str, TaskEntry]:
        for name, entry in tasks.items():
            try:
                task = get_task(name)
                effective = [
                    task.select_mode(fast=m == "fast", fastest=m == "fastest")[0] for m in entry.modes
                ]
            except RaytsegError as exc:
                raise ValueError(str(exc)) from exc
            # TotalSegmentator quietly runs another mode for some flags; a config must say what runs.
            for asked, runs in zip(entry.modes, effective, strict=True):
                if asked != runs:
                    raise ValueError(f"task {name!r} has no {asked!r} mode (it would run {runs!r})")
        return tasks

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.device == "cpu" and any(spec.num_gpus > 0 for spec in self.model_specs()):
            raise ValueError("device cpu with num_gpus > 0 would reserve GPUs it never uses; set num_gpus: 0")
        for spec in self.model_specs():
            check_backend(spec.backend, self.device)
        if self.limits.max_queued_requests < self.ingress.num_replicas:
            raise ValueError(
                f"limits.max_queued_requests ({self.limits.max_queued_requests}) must be at least "
                f"ingress.num_replicas ({self.ingress.num_replicas}): each replica holds a share of it"
            )
        if self.ingress.max_ongoing_requests <= self.limits.max_queued_requests:
            raise ValueError(
                "ingress.max_ongoing_requests must exceed limits.max_queued_requests, "
                "or health and job requests queue behind segmentations"
            )
        if self.shutdown_timeout_s < self.request_timeout_s:
            raise ValueError("graceful_shutdown_timeout_s below request_timeout_s kills running requests")
        return self

    @property
    def shutdown_timeout_s(self) -> float:
        return self.graceful_shutdown_timeout_s or self.request_timeout_s + 120.0

    @property
    def admitted_per_ingress(self) -> int:
        """Segmentations one ingress replica holds: its share of ``limits.max_queued_requests``,
        so the limit holds for the app whatever the number of replicas (Serve's proxy sends a
        request to the less busy of two replicas, so the shares fill evenly)."""
        return self.limits.max_queued_requests // self.ingress.num_replicas

    def model_specs(self) -> list[ModelDeploymentSpec]:
        return [self.models, self.pool, *(e.model for e in self.tasks.values() if e.model is not None)]

    def for_cpu_only(self) -> ServeConfig:
        """This config with every GPU share set to 0 and the models on the CPU."""
        data = self.model_dump(mode="json")
        data["device"] = "cpu"
        for key in ("models", "pool"):
            data[key]["num_gpus"] = 0.0
        for entry in data["tasks"].values():
            if entry["model"] is not None:
                entry["model"]["num_gpus"] = 0.0
        return ServeConfig.model_validate(data)


def load_config(
    source: ServeConfig | Mapping[str, Any] | str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Build the config from a file, builder args and ``RAYTSEG_SERVE__*`` variables.

    Args:
        source: a ``ServeConfig`` (returned with env overrides applied), builder args (a
            mapping; its ``config_file`` key names a YAML file), a YAML file path, or None.
        environ: the environment to read overrides from (``raytseg.config.environment()``
            in a process); None reads none.

    Raises:
        InvalidOptionError: unreadable file, unknown keys or invalid values, with the key.

    Example:
        >>> cfg = load_config({"device": "cpu", "models": {"num_gpus": 0}}, {})
        >>> cfg.device
        'cpu'
    """
    env = dict(environ or {})
    if isinstance(source, ServeConfig):
        data: dict[str, Any] = source.model_dump(mode="json", exclude_unset=True)
        args: dict[str, Any] = {}
    else:
        args = dict(source) if isinstance(source, Mapping) else {}
        path = args.pop("config_file", None) if isinstance(source, Mapping) else source
        path = path or env.get(CONFIG_FILE_ENV)
        data = configfile.read_yaml(path, "serve config") if path else {}
    layered = configfile.merged(configfile.merged(data, args), env_overrides(env))
    return configfile.validated(ServeConfig, layered, "serve config")


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``RAYTSEG_SERVE__A__B=value`` variables as the nested mapping ``{a: {b: value}}``."""
    return configfile.env_overrides(environ, ENV_PREFIX)
