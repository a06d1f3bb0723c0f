"""``build_app``: the Serve application, computed from a ``ServeConfig``.

The same builder is the import path of every way to deploy::

    serve run raytseg.serve.app:build_app config_file=serve.yaml     # local, for a try
    serve build raytseg.serve.app:build_app -o serve-config.yaml     # then edit/deploy it
    raytseg serve --config serve.yaml                                # embedded local Ray

and in a KubeRay ``RayService``::

    serveConfigV2: |
      applications:
        - name: raytseg
          import_path: raytseg.serve.app:build_app
          route_prefix: /
          args: {config_file: /etc/raytseg/serve.yaml}

Deployments (names are stable; Serve config ``deployments:`` entries can override them)::

    Ingress ─┬─ Preprocess              CPU: load + crop/resample/normalise
             ├─ Model<dataset id> ...   one per dedicated model (num_gpus share each)
             ├─ ModelPool               multiplexed: every other model, LRU per replica
             └─ Postprocess             CPU: back to the input grid + export
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application, Deployment

from raytseg.config import environment
from raytseg.serve.config import ModelDeploymentSpec, ServeConfig, StageSpec, load_config
from raytseg.serve.ingress import Ingress
from raytseg.serve.models import ModelServer, pool_class
from raytseg.serve.runtime import (
    HEAD_NODE_RESOURCE,
    INGRESS,
    POOL,
    POSTPROCESS,
    PREPROCESS,
    Catalogue,
    deployment_name,
)
from raytseg.serve.stages import CpuStage


def build_app(args: ServeConfig | Mapping[str, Any] | None = None) -> Application:
    """The raytseg Serve application.

    Args:
        args: a ``ServeConfig``, or the builder args Serve passes (a mapping of config
            keys, with ``config_file`` naming a YAML file). ``RAYTSEG_SERVE__*`` variables
            of the building process override both.

    Raises:
        InvalidOptionError: invalid configuration (names the key).

    Example:
        >>> from ray import serve
        >>> from raytseg.serve.app import build_app
        >>> serve.run(build_app({"device": "cpu", "models": {"num_gpus": 0}}))  # doctest: +SKIP
    """
    config = load_config(args, environment())
    catalogue = Catalogue(config)
    preprocess = _deployment(CpuStage, _stage_options(PREPROCESS, config.preprocess, config))
    postprocess = _deployment(CpuStage, _stage_options(POSTPROCESS, config.postprocess, config))
    models = {
        key: _deployment(ModelServer, _model_options(key, config, catalogue)).bind(config, key)
        for key in catalogue.dedicated_models()
    }
    pool = None
    if config.pool.enabled:
        pool_options = _model_spec_options(POOL, config.pool, config)
        pool = _deployment(pool_class(config.pool.max_models_per_replica), pool_options).bind(config)
    ingress = _deployment(Ingress, _ingress_options(config))
    return ingress.bind(config, preprocess.bind(config), postprocess.bind(config), models, pool)


def required_cpus(config: ServeConfig) -> float:
    """Logical CPUs the app reserves at its initial size (every deployment's first replicas)."""
    catalogue = Catalogue(config)
    specs: list[StageSpec] = [config.preprocess, config.postprocess]
    specs += [catalogue.deployment(key) for key in catalogue.dedicated_models()]
    specs += [config.pool] if config.pool.enabled else []
    total = config.ingress.num_cpus * config.ingress.num_replicas
    for spec in specs:
        scaling = spec.autoscaling
        total += spec.num_cpus * max(scaling.initial_replicas or 0, scaling.min_replicas)
    return total


def _deployment(cls: type, options: dict[str, Any]) -> Deployment:
    decorate: Any = serve.deployment(**options)
    deployment: Deployment = decorate(cls)
    return deployment


def _stage_options(name: str, spec: StageSpec, config: ServeConfig) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.memory_gb is not None:
        actor["memory"] = int(spec.memory_gb * 1024**3)
    return {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "autoscaling_config": spec.autoscaling.model_dump(exclude_none=True),
        # Above the longest request, so scaling down never kills a running segmentation.
        "graceful_shutdown_timeout_s": config.shutdown_timeout_s,
    }


def _model_spec_options(name: str, spec: ModelDeploymentSpec, config: ServeConfig) -> dict[str, Any]:
    options = _stage_options(name, spec, config)
    if spec.num_gpus > 0:
        options["ray_actor_options"]["num_gpus"] = spec.num_gpus
    options["health_check_period_s"] = spec.health_check_period_s
    options["health_check_timeout_s"] = spec.health_check_timeout_s
    return options


def _model_options(key: str, config: ServeConfig, catalogue: Catalogue) -> dict[str, Any]:
    return _model_spec_options(deployment_name(key), catalogue.deployment(key), config)


def _ingress_options(config: ServeConfig) -> dict[str, Any]:
    limits = config.limits
    actor: dict[str, Any] = {"num_cpus": config.ingress.num_cpus}
    if config.ingress.on_head:
        actor["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return {
        "name": INGRESS,
        "num_replicas": config.ingress.num_replicas,
        "ray_actor_options": actor,
        "max_ongoing_requests": config.ingress.max_ongoing_requests,
        # Serve's own queue in front of the ingress: finite, answered with Retry-After.
        "max_queued_requests": config.ingress.max_ongoing_requests,
        "backpressure_config": {"status_code": limits.overload_status, "retry_after_s": limits.retry_after_s},
        "graceful_shutdown_timeout_s": config.shutdown_timeout_s,
    }
