"""ServeConfig: defaults, sources and their precedence, and every refusal (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytseg.errors import InvalidOptionError
from raytseg.serve.config import ServeConfig, env_overrides, load_config


def test_defaults_are_production_safe() -> None:
    cfg = ServeConfig()
    assert cfg.models.max_ongoing_requests == 1
    assert cfg.models.max_queued_requests > 0
    assert cfg.limits.max_queued_requests > 0
    assert cfg.models.autoscaling.downscale_delay_s >= 600
    assert cfg.shutdown_timeout_s > cfg.request_timeout_s
    assert 0 < cfg.models.num_gpus < 1
    assert cfg.tasks["total"].modes == ("default", "fast")
    assert cfg.jobs.allowed_prefixes == ()


def test_file_then_args_then_env(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("device: cpu\nmodels: {num_gpus: 0, num_cpus: 2}\nlimits: {max_body_bytes: 1000}\n")
    args = {"config_file": str(path), "limits": {"max_body_bytes": 2000, "retry_after_s": 5}}
    env = {
        "RAYTSEG_SERVE__LIMITS__MAX_BODY_BYTES": "3000",
        "RAYTSEG_SERVE__POOL__NUM_GPUS": "0",
        "OTHER": "x",
    }
    cfg = load_config(args, env)
    assert cfg.device == "cpu"
    assert cfg.models.num_cpus == 2  # from the file, merged key by key with the args
    assert cfg.limits.max_body_bytes == 3000  # env wins
    assert cfg.limits.retry_after_s == 5


def test_config_file_from_env(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("tasks: {body: {modes: [fast]}}\n")
    cfg = load_config(None, {"RAYTSEG_SERVE_CONFIG": str(path)})
    assert list(cfg.tasks) == ["body"]


def test_env_values_are_yaml_typed() -> None:
    env = {
        "RAYTSEG_SERVE__JOBS__ALLOWED_PREFIXES": "[memory://a/, /data]",
        "RAYTSEG_SERVE__POOL__ENABLED": "false",
    }
    assert env_overrides(env) == {
        "jobs": {"allowed_prefixes": ["memory://a/", "/data"]},
        "pool": {"enabled": False},
    }


def test_a_config_object_still_takes_env_overrides() -> None:
    base = ServeConfig(device="cpu", models={"num_gpus": 0}, pool={"num_gpus": 0})  # type: ignore[arg-type]
    cfg = load_config(base, {"RAYTSEG_SERVE__LIMITS__MAX_QUEUED_REQUESTS": "3"})
    assert cfg.device == "cpu"
    assert cfg.limits.max_queued_requests == 3


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        ({"devise": "cpu"}, "devise: Extra inputs are not permitted"),
        ({"limits": {"max_body_byte": 1}}, "limits.max_body_byte"),
        ({"tasks": {"totl": {}}}, "Unknown task 'totl'"),
        ({"tasks": {"lung_vessels": {"modes": ["fast"]}}}, "has no 'fast' mode"),
        ({"tasks": {"body": {"modes": ["fastest"]}}}, "has no 'fastest' mode"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"device": "cpu"}, "num_gpus: 0"),
        ({"models": {"num_gpus": 1.5}}, "models.num_gpus"),
        (
            {"models": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
            "min_replicas 3 > max_replicas 2",
        ),
        ({"ingress": {"max_ongoing_requests": 4}, "limits": {"max_queued_requests": 8}}, "must exceed"),
        ({"request_timeout_s": 100, "graceful_shutdown_timeout_s": 50}, "kills running requests"),
        ({"jobs": {"allowed_prefixes": ["relative/dir"]}}, "absolute path or a URI"),
        ({"jobs": {"store": "records"}}, "jobs.store 'records' must be an absolute path"),
        ({"ingress": {"num_replicas": 3}, "limits": {"max_queued_requests": 2}}, "must be at least"),
        (
            {"jobs": {"allowed_prefixes": ["s3://b/data/"], "store": "s3://b/data/jobs"}},
            "overlaps the allowed prefix 's3://b/data/'",
        ),
        ({"jobs": {"allowed_prefixes": ["s3://b/data/out"], "store": "s3://b/data"}}, "overlaps"),
        ({"tasks": {}}, "tasks"),
    ],
)
def test_invalid_configs_name_the_key(args: dict[str, object], phrase: str) -> None:
    with pytest.raises(InvalidOptionError, match="Invalid serve config") as info:
        load_config(args, {})
    assert phrase in str(info.value)


def test_invalid_values_are_not_echoed() -> None:
    with pytest.raises(InvalidOptionError) as info:
        load_config({"limits": {"max_body_bytes": "s3cr3t-looking-value"}}, {})
    assert "s3cr3t" not in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="Cannot read the serve config"):
        load_config({"config_file": str(tmp_path / "missing.yaml")}, {})
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InvalidOptionError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml", {})


def test_for_cpu_only_drops_every_gpu_share() -> None:
    cfg = load_config({"tasks": {"total": {"modes": ["fast"], "model": {"num_gpus": 0.5}}}}, {})
    cpu = cfg.for_cpu_only()
    assert cpu.device == "cpu"
    assert all(spec.num_gpus == 0 for spec in cpu.model_specs())


def test_each_ingress_replica_holds_its_share_of_the_queue_limit() -> None:
    shares = {
        n: load_config({"ingress": {"num_replicas": n}, "limits": {"max_queued_requests": 16}}, {})
        for n in (1, 2, 3)
    }
    assert {n: c.admitted_per_ingress for n, c in shares.items()} == {1: 16, 2: 8, 3: 5}
