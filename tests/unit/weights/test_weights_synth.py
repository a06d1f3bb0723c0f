from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from raytseg.errors import InvalidOptionError
from raytseg.tasks.registry import ModelSpec, get_task
from raytseg.weights.store import dataset_folder_name
from raytseg.weights.synth import (
    SYNTHETIC_MARKER,
    build_plans,
    is_synthetic,
    synthesize,
    synthesize_task,
)

EXAMPLE_CT = (
    Path(__file__).resolve().parents[4] / "shared" / "data" / "totalseg-reference" / "example_ct_sm.nii.gz"
)
FAST = get_task("total").modes["fast"].models[0]  # 297
TRAINER_297 = FAST.trainer_folder


def model(task: str, mode: str = "default") -> ModelSpec:
    return get_task(task).modes[mode].models[0]


def load_folder(folder: Path, fold: int = 0) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    checkpoint = torch.load(folder / f"fold_{fold}" / "checkpoint_final.pth", weights_only=True)
    return plans, dataset_json, checkpoint


def network_for(folder: Path, fold: int = 0) -> torch.nn.Module:
    """The network as raytseg builds it: PlansManager, get_network_from_plans, strict load."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset_json, checkpoint = load_folder(folder, fold)
    config = PlansManager(plans).get_configuration(checkpoint["init_args"]["configuration"])
    network = get_network_from_plans(
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        1,
        len(dataset_json["labels"]),
        allow_init=False,
        deep_supervision=False,
    )
    network.load_state_dict(checkpoint["network_weights"], strict=True)
    return network.eval()


# --- files and keys ----------------------------------------------------------------------


def test_tiny_folder_has_nnunet_files_and_keys(tiny_root: Path) -> None:
    folder = tiny_root / dataset_folder_name(297) / TRAINER_297
    assert sorted(p.name for p in folder.iterdir()) == [
        SYNTHETIC_MARKER,
        "dataset.json",
        "fold_0",
        "plans.json",
    ]
    plans, dataset_json, checkpoint = load_folder(folder)
    assert list(plans) == [
        "dataset_name",
        "plans_name",
        "original_median_spacing_after_transp",
        "original_median_shape_after_transp",
        "image_reader_writer",
        "transpose_forward",
        "transpose_backward",
        "configurations",
        "experiment_planner_used",
        "label_manager",
        "foreground_intensity_properties_per_channel",
    ]
    assert plans["dataset_name"] == dataset_folder_name(297)
    assert plans["image_reader_writer"] == "NibabelIOWithReorient"
    config = plans["configurations"]["3d_fullres"]
    assert config["spacing"] == [3.0, 3.0, 3.0]
    assert config["patch_size"] == [32, 32, 32]
    assert config["normalization_schemes"] == ["CTNormalization"]
    assert config["resampling_fn_data_kwargs"] == {
        "is_seg": False,
        "order": 3,
        "order_z": 0,
        "force_separate_z": None,
    }
    assert config["resampling_fn_seg_kwargs"]["is_seg"] is True
    assert config["resampling_fn_probabilities_kwargs"]["order"] == 1
    arch = config["architecture"]
    assert arch["network_class_name"] == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16]
    assert arch["arch_kwargs"]["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert arch["_kw_requires_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]
    assert set(plans["foreground_intensity_properties_per_channel"]["0"]) == {
        "max", "mean", "median", "min", "percentile_00_5", "percentile_99_5", "std"
    }  # fmt: skip
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["numTraining"] == 1559
    labels = dataset_json["labels"]
    assert list(labels.items())[:2] == [("background", 0), (FAST.labels[1], 1)]
    assert list(labels.values()) == list(range(118))
    assert checkpoint["trainer_name"] == "nnUNetTrainer_4000epochs_NoMirroring"
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert checkpoint["init_args"]["plans"] == plans
    assert checkpoint["init_args"]["dataset_json"] == dataset_json
    assert set(checkpoint) >= {
        "optimizer_state",
        "grad_scaler_state",
        "logging",
        "_best_ema",
        "current_epoch",
    }


@pytest.mark.parametrize(
    ("task", "mode", "spacing", "patch", "last_stride", "features"),
    [
        ("total", "fast", [3.0, 3.0, 3.0], [112, 112, 128], [1, 1, 2], [32, 64, 128, 256, 320, 320]),
        ("total", "default", [1.5, 1.5, 1.5], [128, 128, 128], [2, 2, 2], [32, 64, 128, 256, 320, 320]),
        ("total", "fastest", [6.0, 6.0, 6.0], [64, 64, 64], [2, 2, 2], [32, 64, 128, 256, 320]),
        ("lung_vessels", "default", [1.0, 0.703125, 0.703125], [128, 128, 128], [2, 2, 2], None),
        ("pleural_pericard_effusion", "default", [2.5, 0.8, 0.8], [128, 128, 128], [2, 2, 2], None),
    ],
)
def test_realistic_plans_follow_the_spacing(
    task: str,
    mode: str,
    spacing: list[float],
    patch: list[int],
    last_stride: list[int],
    features: list[int] | None,
) -> None:
    modes = get_task(task).modes[mode]
    spec = modes.models[0]
    plans = build_plans(
        spec,
        "DatasetX",
        modality="CT",
        target_spacing_xyz=modes.resample_mm,
        tiny=False,
        seed=spec.dataset_id,
    )
    config = plans["configurations"][spec.configuration]
    kwargs = config["architecture"]["arch_kwargs"]
    assert config["spacing"] == spacing
    assert config["patch_size"] == patch
    assert kwargs["strides"][0] == [1, 1, 1]
    assert kwargs["strides"][-1] == last_stride
    for axis, size in enumerate(patch):
        pools = sum(stride[axis] == 2 for stride in kwargs["strides"])
        assert size % 2**pools == 0
        assert size // 2**pools >= 4
    if features is not None:
        assert kwargs["features_per_stage"] == features


def test_mr_models_use_zscore_and_mri_channel(tmp_path: Path) -> None:
    [folder] = synthesize_task("vertebrae_mr", tmp_path, tiny=True)
    plans, dataset_json, _ = load_folder(folder)
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert dataset_json["channel_names"] == {"0": "MRI"}


def test_intensity_statistics_are_realistic_and_differ_per_dataset() -> None:
    stats = [
        build_plans(FAST, "D", modality="CT", target_spacing_xyz=None, tiny=True, seed=seed)[
            "foreground_intensity_properties_per_channel"
        ]["0"]
        for seed in (291, 292)
    ]
    assert stats[0] != stats[1]
    for s in stats:
        assert 50 < s["mean"] < 150
        assert 200 < s["std"] < 400
        assert -1024 <= s["percentile_00_5"] < -950
        assert 1300 < s["percentile_99_5"] < 1700


# --- determinism, folds, markers -------------------------------------------------------------


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    name = dataset_folder_name(297)
    kwargs: dict[str, Any] = {"modality": "CT", "target_spacing_xyz": (3.0, 3.0, 3.0), "tiny": True}
    a = synthesize(FAST, name, tmp_path / "a", seed=297, **kwargs)
    b = synthesize(FAST, name, tmp_path / "b", seed=297, **kwargs)
    c = synthesize(FAST, name, tmp_path / "c", seed=298, **kwargs)
    assert (a / "plans.json").read_bytes() == (b / "plans.json").read_bytes()
    wa, wb, wc = (load_folder(x)[2]["network_weights"] for x in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "plans.json").read_bytes() != (c / "plans.json").read_bytes()


def test_folds_none_writes_five_different_folds(tmp_path: Path) -> None:
    [folder] = synthesize_task("pleural_pericard_effusion", tmp_path, tiny=True, with_crop_models=False)
    assert sorted(p.name for p in folder.glob("fold_*")) == [f"fold_{k}" for k in range(5)]
    w0, w1 = (load_folder(folder, k)[2]["network_weights"] for k in (0, 1))
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)
    assert load_folder(folder, 3)[2]["init_args"]["fold"] == 3


def test_synthesize_task_uses_catalogue_names_and_crop_models(tmp_path: Path) -> None:
    folders = synthesize_task("teeth", tmp_path, tiny=True)
    assert [f.parent.name for f in folders] == [dataset_folder_name(i) for i in (113, 115, 298, 297)]
    assert folders[0].name == "nnUNetTrainer_onlyMirror01__nnUNetPlans__3d_lowres_high"
    _, _, checkpoint = load_folder(folders[0])
    assert checkpoint["inference_allowed_mirroring_axes"] == [0, 1]
    assert checkpoint["init_args"]["configuration"] == "3d_lowres_high"
    assert load_folder(folders[1])[2]["inference_allowed_mirroring_axes"] is None  # *_NoMirroring


def test_marker_and_refusal_to_overwrite_real_weights(tmp_path: Path) -> None:
    name = dataset_folder_name(297)
    kwargs: dict[str, Any] = {
        "modality": "CT",
        "target_spacing_xyz": (3.0, 3.0, 3.0),
        "tiny": True,
        "seed": 1,
    }
    folder = synthesize(FAST, name, tmp_path, **kwargs)
    assert is_synthetic(folder)
    assert "meaningless" in (folder / SYNTHETIC_MARKER).read_text()
    assert synthesize(FAST, name, tmp_path, **kwargs) == folder  # synthetic: replaced
    (folder / SYNTHETIC_MARKER).unlink()
    assert not is_synthetic(folder)
    with pytest.raises(InvalidOptionError, match="real weights"):
        synthesize(FAST, name, tmp_path, **kwargs)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


# --- the networks ------------------------------------------------------------------------


def _ct_patch(plans: dict[str, Any]) -> torch.Tensor:
    """A 32³ patch of the example CT (or a synthetic body), CT-normalised with the plans."""
    if EXAMPLE_CT.exists():
        import nibabel as nib

        data = np.asarray(nib.load(EXAMPLE_CT).dataobj, dtype=np.float32).transpose(2, 1, 0)
        z, y, x = (s // 2 for s in data.shape)
        patch = np.full((32, 32, 32), -1024.0, dtype=np.float32)
        crop = data[max(z - 16, 0) : z + 16, y - 16 : y + 16, x - 16 : x + 16]
        patch[: crop.shape[0]] = crop
    else:
        grid = np.mgrid[-16:16, -16:16, -16:16].astype(np.float32)
        patch = np.where((grid**2).sum(0) < 196, 40.0 + 30 * np.sin(grid[1] / 3), -1000.0).astype(np.float32)
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    patch = np.clip(patch, props["percentile_00_5"], props["percentile_99_5"])
    return torch.from_numpy((patch - props["mean"]) / props["std"])[None, None]


def test_tiny_297_loads_strictly_and_predicts_many_labels(tiny_root: Path) -> None:
    folder = tiny_root / dataset_folder_name(297) / TRAINER_297
    network = network_for(folder)
    with torch.inference_mode():
        labels = network(_ct_patch(load_folder(folder)[0])).argmax(1)
    values, counts = torch.unique(labels, return_counts=True)
    assert int((counts > 20).sum()) >= 10, dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert 0.2 < float((labels == 0).float().mean()) < 0.95  # background covers a realistic share


def test_realistic_297_loads_strictly(tmp_path: Path) -> None:
    [folder] = synthesize_task("total", tmp_path, fast=True, with_crop_models=False)
    size_mb = (folder / "fold_0" / "checkpoint_final.pth").stat().st_size / 1e6
    assert 80 < size_mb < 200
    network = network_for(folder)
    assert sum(p.numel() for p in network.parameters()) > 20_000_000


def test_small_model_size_writes_residual_encoder_plans(tmp_path: Path) -> None:
    folders = synthesize_task("total_v3", tmp_path, tiny=True, with_crop_models=False, small=True)
    assert [f.name for f in folders] == ["nnUNetTrainerNoMirroring__nnUNetResEncUNetLPlans_8__3d_fullres"] * 5
    plans, _, _ = load_folder(folders[0])
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert plans["plans_name"] == "nnUNetResEncUNetLPlans_8"
    assert arch["network_class_name"].endswith(".ResidualEncoderUNet")
    assert arch["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4]
    network = network_for(folders[0])  # the checkpoint loads strictly into that network
    assert type(network).__name__ == "ResidualEncoderUNet"
    with pytest.raises(InvalidOptionError, match="total_v3"):
        synthesize_task("total", tmp_path, tiny=True, small=True)
