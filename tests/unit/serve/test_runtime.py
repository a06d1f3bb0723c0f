"""The service's catalogue and its weights check before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytseg.cli import main
from raytseg.errors import MissingWeightsError
from raytseg.serve.config import ServeConfig, load_config
from raytseg.serve.runtime import Catalogue, check_weights


@pytest.fixture(scope="module")
def fast_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)
    return root


def _config(weights: Path, modes: list[str]) -> ServeConfig:
    return load_config(
        {
            "device": "cpu",
            "weights": str(weights),
            "tasks": {"total": {"modes": modes}},
            "models": {"num_gpus": 0},
            "pool": {"num_gpus": 0},
        },
        {},
    )


def test_served_models_are_the_models_of_every_served_mode(fast_weights: Path) -> None:
    served = Catalogue(_config(fast_weights, ["default", "fast"])).served_models()
    assert sorted(spec.dataset_id for spec in served.values()) == [291, 292, 293, 294, 295, 297]


def test_weights_of_every_served_model_are_checked_at_once(fast_weights: Path) -> None:
    check_weights(_config(fast_weights, ["fast"]))
    with pytest.raises(MissingWeightsError) as missing:
        check_weights(_config(fast_weights, ["default", "fast"]))
    message = str(missing.value)
    for dataset in (291, 292, 293, 294, 295):
        assert f"dataset {dataset} are missing" in message
    assert "raytseg weights download -t total" in message


def test_raytseg_serve_says_which_weights_are_missing_and_exits(
    fast_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.yaml"
    tasks = "tasks: {total: {modes: [default]}}"
    config.write_text(f"weights: {fast_weights}\n{tasks}\nmodels: {{num_gpus: 0}}\npool: {{num_gpus: 0}}\n")
    assert main(["serve", "--config", str(config), "--device", "cpu"]) == 1
    assert "dataset 291 are missing" in capsys.readouterr().err


def test_a_model_deployment_runs_the_backend_its_config_names(
    fast_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    from raytseg.serve.models import ModelServer

    monkeypatch.setenv("RAYTSEG_CACHE_DIR", str(tmp_path / "cache"))
    config = _config(fast_weights, ["fast"])
    data = config.model_dump(mode="json")
    data["tasks"]["total"]["model"] = {**data["models"], "backend": "openvino"}
    config = ServeConfig.model_validate(data)
    catalogue = Catalogue(config)
    [key] = catalogue.dedicated_models()
    assert (catalogue.deployment(key).backend, config.models.backend) == ("openvino", "auto")
    assert ModelServer(config, key)._model.backend == "openvino"
    assert ModelServer(_config(fast_weights, ["fast"]), key)._model.backend == "torch"
