"""The rendered serveConfigV2 and batch job config are what raytseg and Ray accept.

serveConfigV2 goes through Ray Serve's own schema (what the Serve controller validates when
KubeRay submits it), its application args through raytseg's ``load_config`` into
``ServeConfig``, and ``build_app`` builds the Application from them (nothing is deployed).
The batch ConfigMap parses into ``BatchConfig`` and the RayJob's entrypoint parses with the
batch command line.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest
import yaml

pytest.importorskip("ray.serve")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from raytseg.batch.config import BatchConfig  # noqa: E402
from raytseg.serve.config import ServeConfig, load_config  # noqa: E402

RENDERS = ("default", "ci", "deploy")


def serve_config_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    service = next(o for o in objects if o["kind"] == "RayService")
    config: dict[str, Any] = yaml.safe_load(service["spec"]["serveConfigV2"])
    return config


@pytest.mark.parametrize("values", RENDERS)
def test_serve_config_is_valid_for_serve(renders: dict[str, Any], values: str) -> None:
    config = serve_config_of(renders[values])
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "raytseg.serve.app:build_app"
    assert app.route_prefix == "/"
    assert schema.http_options.host == "0.0.0.0"
    assert schema.http_options.port == 8000


@pytest.mark.parametrize("values", RENDERS)
def test_app_args_are_a_serve_config_and_build(renders: dict[str, Any], values: str) -> None:
    from ray.serve import Application

    from raytseg.serve.app import build_app

    (app,) = serve_config_of(renders[values])["applications"]
    config = load_config(app["args"], {})
    assert isinstance(config, ServeConfig)
    # The proxy waits a minute longer than the app, which answers 504 itself first.
    http = serve_config_of(renders[values])["http_options"]
    assert http["request_timeout_s"] == config.request_timeout_s + 60
    assert isinstance(build_app(app["args"]), Application)


@pytest.mark.parametrize("values", RENDERS)
def test_args_are_the_serve_values(chart: Any, renders: dict[str, Any], values: str) -> None:
    """The args are the `serve` values block, plus the mounted token file, nothing else."""
    files = {"default": [], "ci": [chart.CI_VALUES], "deploy": [chart.DEPLOY_VALUES]}[values]
    serve_values = yaml.safe_load((chart.CHART / "values.yaml").read_text())["serve"]
    for path in files:
        serve_values = _merged(serve_values, yaml.safe_load(path.read_text()).get("serve", {}))
    (app,) = serve_config_of(renders[values])["applications"]
    expected = _merged(serve_values, {"auth": {"token_file": "/var/run/secrets/raytseg/api/tokens"}})
    assert app["args"] == expected


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def test_token_file_is_mounted_where_the_config_says(renders: dict[str, Any]) -> None:
    objects = renders["deploy"]
    (app,) = serve_config_of(objects)["applications"]
    token_dir = app["args"]["auth"]["token_file"].rsplit("/", 1)[0]
    service = next(o for o in objects if o["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:  # the ingress may run on any worker
        (container,) = template["spec"]["containers"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == token_dir)
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "raytseg-api-tokens"


def test_deployment_overrides_name_real_deployments(renders: dict[str, Any]) -> None:
    from raytseg.serve.app import build_app

    (app,) = serve_config_of(renders["ci"])["applications"]
    assert app["deployments"] == [{"name": "Model297", "max_replicas_per_node": 1}]
    names = deployment_names(build_app(app["args"]))
    assert names == {"Ingress", "Preprocess", "Postprocess", "Model297"}  # ci: total --fast, no pool
    assert {d["name"] for d in app["deployments"]} <= names


def deployment_names(app: Any) -> set[str]:
    """The deployments Serve would create for an Application (its own build step; Ray has
    no public call that lists them without deploying)."""
    from ray.serve._private.build_app import build_app as build

    return {deployment.name for deployment in build(app, name="raytseg").deployments}


@pytest.mark.parametrize("values", ["ci", "deploy"])
def test_batch_job_config_and_entrypoint(renders: dict[str, Any], values: str) -> None:
    objects = renders[values]
    job = next(o for o in objects if o["kind"] == "RayJob")
    config_map = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == job["metadata"]["name"]
    )
    parsed = BatchConfig.model_validate(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert parsed.address is None  # the RayJob's RAY_ADDRESS says where the cluster is

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "raytseg.batch"]
    config_path = argv[argv.index("--config") + 1]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(
        m for m in head["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")
    )
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    # The entrypoint's flags are the batch command line's.
    import argparse

    from raytseg.batch.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv[3:])
    assert args.config == config_path
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
