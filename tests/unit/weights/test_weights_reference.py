"""TotalSegmentator itself loads raytseg's synthetic folders unchanged.

Runs nnU-Net's ``initialize_from_trained_model_folder`` in the reference environment (the
TotalSegmentator 2.18 package, which registers its custom trainers on import), then a
small prediction. The environment comes from the ``ts_python`` fixture (``tests/conftest.py``):
skipped without it, failed instead under ``RAYTSEG_REQUIRE_REFERENCE=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from raytseg.tasks.registry import get_task
from raytseg.weights.store import dataset_folder_name
from raytseg.weights.synth import synthesize_task

REPO = Path(__file__).resolve().parents[3]

LOAD_AND_PREDICT = """
import json, sys
import numpy as np, torch
import totalsegmentator.nnunet  # registers TotalSegmentator's custom trainers
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

for folder in sys.argv[1:]:
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, use_folds=[0],
                                                   checkpoint_name="checkpoint_final.pth")
    # An image already at the model's spacing: nothing to resample, one 32³ tile.
    spacing = predictor.configuration_manager.spacing
    image = np.random.default_rng(0).normal(0, 300, (1, 24, 40, 40)).astype(np.float32)
    seg = predictor.predict_single_npy_array(image, {"spacing": spacing}, None, None, False)
    print(json.dumps({"trainer": predictor.trainer_name, "shape": list(seg.shape),
                      "labels": int(len(np.unique(seg))),
                      "mirroring": predictor.allowed_mirroring_axes}))
"""


@pytest.mark.reference
def test_totalsegmentator_loads_synthetic_folders(tmp_path: Path, ts_python: Path) -> None:
    folders = synthesize_task("total", tmp_path, fast=True, tiny=True, with_crop_models=False)  # 297
    folders += synthesize_task("total", tmp_path, tiny=True, with_crop_models=False)[:1]  # 291
    folders += synthesize_task(
        "coronary_arteries", tmp_path, tiny=True, with_crop_models=False
    )  # 509, licensed
    folders += synthesize_task("appendicular_bones", tmp_path, tiny=True)  # 304, licensed
    assert [f.parent.name for f in folders] == [dataset_folder_name(i) for i in (297, 291, 509, 304)]
    env = os.environ | {"TOTALSEG_HOME_DIR": str(tmp_path / "tshome"), "nnUNet_results": str(tmp_path)}
    result = subprocess.run(
        [str(ts_python), "-c", LOAD_AND_PREDICT, *map(str, folders)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["trainer"] for a in answers] == [
        get_task("total").modes["fast"].models[0].trainer,
        "nnUNetTrainerNoMirroring",
        "nnUNetTrainerSkeletonRecall",
        "nnUNetTrainerNoMirroring",
    ]
    assert all(a["shape"] == [24, 40, 40] for a in answers)
    assert answers[0]["mirroring"] is None
