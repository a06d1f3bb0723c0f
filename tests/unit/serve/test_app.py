"""Deployment options computed from the config (no Ray cluster needed)."""

from __future__ import annotations

from raytseg.serve import app as serve_app
from raytseg.serve.config import load_config
from raytseg.serve.runtime import Catalogue, deployment_name

TOTAL_FAST = "297/nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
LUNG_VESSELS = "117/nnUNetTrainerSkeletonRecall__nnUNetPlans__3d_fullres"


def test_dedicated_models_follow_the_served_tasks() -> None:
    config = load_config({"tasks": {"total": {"modes": ["default", "fast"]}, "lung_vessels": {}}}, {})
    keys = Catalogue(config).dedicated_models()
    # lung_vessels finds the lungs with the 3 mm model, which total --fast has already
    assert [k.split("/")[0] for k in keys] == ["291", "292", "293", "294", "295", "297", "117"]
    assert deployment_name(TOTAL_FAST) == "Model297"
    pooled = load_config({"tasks": {"total": {"modes": ["fast"]}, "lung_vessels": {"dedicated": False}}}, {})
    assert list(Catalogue(pooled).dedicated_models()) == [TOTAL_FAST]


def test_model_options() -> None:
    config = load_config(
        {
            "tasks": {"total": {"modes": ["fast"], "model": {"num_gpus": 0.5, "max_ongoing_requests": 2}}},
            "models": {"num_gpus": 0.2},
            "request_timeout_s": 600,
        },
        {},
    )
    options = serve_app._model_options(TOTAL_FAST, config, Catalogue(config))
    assert options["name"] == "Model297"
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert options["max_ongoing_requests"] == 2
    assert options["max_queued_requests"] == 32
    assert options["graceful_shutdown_timeout_s"] == 720
    assert options["autoscaling_config"]["downscale_delay_s"] == 900
    assert options["health_check_period_s"] == 10


def test_cpu_only_models_reserve_no_gpu() -> None:
    config = load_config({"device": "cpu", "models": {"num_gpus": 0}, "pool": {"num_gpus": 0}}, {})
    options = serve_app._model_spec_options("ModelPool", config.pool, config)
    assert "num_gpus" not in options["ray_actor_options"]


def test_ingress_queue_is_finite_with_retry_after() -> None:
    config = load_config({"limits": {"overload_status": 429, "retry_after_s": 9}}, {})
    options = serve_app._ingress_options(config)
    assert options["max_queued_requests"] == options["max_ongoing_requests"] == 64
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 9}


def test_ingress_on_head_asks_for_the_head_node() -> None:
    config = load_config({"ingress": {"on_head": True, "num_cpus": 0}}, {})
    actor = serve_app._ingress_options(config)["ray_actor_options"]
    assert actor == {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    assert "resources" not in serve_app._ingress_options(load_config({}, {}))["ray_actor_options"]


def test_required_cpus() -> None:
    config = load_config({"tasks": {"total": {"modes": ["fast"]}}, "pool": {"enabled": False}}, {})
    assert serve_app.required_cpus(config) == 0.5 + 1 + 1 + 1  # ingress, pre, post, Model297


def test_pool_class_is_multiplexed() -> None:
    from ray.serve._private.utils import _callable_uses_multiplexing

    from raytseg.serve.models import pool_class

    assert _callable_uses_multiplexing(pool_class(2))


def test_build_app_wires_every_stage_behind_the_ingress() -> None:
    from ray.serve._private.build_app import build_app as build

    app = serve_app.build_app({"device": "cpu", "models": {"num_gpus": 0}, "pool": {"num_gpus": 0}})
    built = build(app, name="raytseg")
    cpus = {d.name: d.ray_actor_options.get("num_cpus") for d in built.deployments}
    parts = [f"Model{dataset}" for dataset in (291, 292, 293, 294, 295, 297)]  # total, total --fast
    assert set(cpus) == {"Ingress", "Preprocess", "Postprocess", "ModelPool", *parts}
    assert built.ingress_deployment_name == "Ingress"
    assert cpus["Ingress"] == 0.5
    assert all(not d.ray_actor_options.get("num_gpus") for d in built.deployments)
