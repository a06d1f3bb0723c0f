"""raytseg's lean CPU sliding window gives exactly nnU-Net's logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raytseg.config import Settings
from raytseg.pipeline import sliding_window
from raytseg.pipeline.backends import Conversion
from raytseg.pipeline.model import LoadedModel, ModelFiles
from raytseg.pipeline.preprocess import ModelPlans, model_key
from raytseg.tasks import get_task
from raytseg.weights.store import WeightsStore
from raytseg.weights.synth import synthesize_task


def fast_model_files(root: Path, *, tiny: bool) -> ModelFiles:
    """The seeded synthetic 3 mm model of ``total --fast`` under ``root``."""
    synthesize_task("total", root, fast=True, tiny=tiny, with_crop_models=False)
    spec = get_task("total").modes["fast"].models[0]
    store = WeightsStore(Settings.from_env({"RAYTSEG_WEIGHTS": str(root), "HOME": str(root)}))
    plans, dataset_json = store.read_plans(spec)
    return ModelFiles(
        ModelPlans(model_key(spec), spec.configuration, plans, dataset_json),
        tuple(store.checkpoint_paths(spec)),
    )


def load_fast_model(root: Path, *, tiny: bool, conversion: Conversion | None = None) -> LoadedModel:
    return LoadedModel.load(fast_model_files(root, tiny=tiny), torch.device("cpu"), conversion)


@pytest.mark.parametrize(
    ("tiny", "shape", "step"),
    [
        (True, (1, 45, 70, 33), 0.5),  # several tiles, padding on one axis
        (True, (1, 20, 21, 22), 0.8),  # smaller than one patch: padding only
        # the real 3 mm architecture (118 classes, 6 stages) on one tile: ~20 s a tile, both ways
        (False, (1, 112, 112, 128), 0.8),
    ],
)
def test_lean_window_equals_nnunet_sliding_window(
    tmp_path: Path, tiny: bool, shape: tuple[int, ...], step: float
) -> None:
    model = load_fast_model(tmp_path, tiny=tiny)
    predictor = model._predictor
    assert sliding_window.supports(predictor.network, predictor.configuration_manager.patch_size)
    predictor.tile_step_size = step
    data = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = sliding_window.predict_logits(predictor, data)
    with torch.inference_mode():
        theirs = predictor.predict_sliding_window_return_logits(data)
    assert ours.dtype == theirs.dtype == torch.half
    assert torch.equal(ours, theirs)


def test_decoder_features_feed_the_output_layer_exactly(tmp_path: Path) -> None:
    network = load_fast_model(tmp_path, tiny=True)._predictor.network
    tile = torch.randn((1, 1, 32, 32, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(
            network.decoder.seg_layers[-1](sliding_window.decoder_features(network, tile)), network(tile)
        )


def test_device_window_with_one_tile_per_pass_is_nnunets_loop(tmp_path: Path) -> None:
    """The GPU window's bookkeeping (tile order, Gaussian, fp16 accumulation, padding) is
    nnU-Net's: one tile per pass, on a CPU, gives nnU-Net's logits bit for bit."""
    predictor, data = _window_case(tmp_path)
    ours = sliding_window.predict_logits_on_device(predictor, data, 1)
    with torch.inference_mode():
        theirs = predictor.predict_sliding_window_return_logits(data)
    assert ours.dtype == theirs.dtype == torch.half
    assert torch.equal(ours, theirs)


def test_device_window_with_several_tiles_per_pass_keeps_the_labels(tmp_path: Path) -> None:
    """Batched convolutions round differently (oneDNN here, cuDNN on a GPU): a few fp16 ulps,
    no label changes on this case. bench/gpu/run.py measures the GPU's."""
    predictor, data = _window_case(tmp_path)
    ours = sliding_window.predict_logits_on_device(predictor, data, 3)
    with torch.inference_mode():
        theirs = predictor.predict_sliding_window_return_logits(data)
    assert ours.shape == theirs.shape
    assert torch.equal(ours.argmax(0), theirs.argmax(0))
    assert float((ours.float() - theirs.float()).abs().max()) < 0.1


def _window_case(tmp_path: Path) -> tuple[Any, torch.Tensor]:
    predictor = load_fast_model(tmp_path, tiny=True)._predictor
    predictor.tile_step_size = 0.5
    return predictor, torch.randn((1, 45, 70, 33), generator=torch.Generator().manual_seed(2))
