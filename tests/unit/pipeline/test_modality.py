"""The modality classifiers (TotalSegmentator's XGBoost folds, from its installed package)
and the statistics their ROI variant needs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import MissingResourceError
from raytseg.pipeline import modality
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.records import Segmentation, SegmentOptions, TaskChoice, Volume
from raytseg.pipeline.stats import basic_statistics

REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "totalseg-reference"
LIMITS = LoadLimits(max_voxels=1 << 30, max_archive_bytes=1 << 30)
pytest.importorskip("xgboost")


@pytest.mark.parametrize("name", ["example_ct_sm", "example_ct", "example_mr_sm"])
def test_intensity_features_are_totalsegmentators(name: str) -> None:
    path = REFERENCE / f"{name}.nii.gz"
    data = nib.load(path).get_fdata()  # what totalseg_get_modality's get_features reads
    expected = [np.mean(data), np.std(data), np.min(data), np.max(data)]
    assert modality.intensity_features(load_volume(path, LIMITS)) == expected


def test_the_reference_images_are_all_ct_to_the_intensity_classifier() -> None:
    for name in ("example_ct_sm", "example_ct", "example_mr_sm"):
        guess = modality.modality_of(load_volume(REFERENCE / f"{name}.nii.gz", LIMITS), None)
        assert guess == modality.ModalityGuess("ct", 1.0), name
    assert json.loads(guess.to_json()) == {"modality": "ct", "probability": 1.0}


def test_mr_like_intensities_are_mr() -> None:
    # An image of non-negative values around 200 (no air at -1000): the classifier says MR.
    assert modality.classify([200.0, 150.0, 0.0, 900.0], modality.INTENSITY_MODELS).modality == "mr"


def test_classifiers_come_from_the_configured_folder_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raytseg import resources

    monkeypatch.setenv("RAYTSEG_TS_RESOURCES", str(tmp_path))
    installed = resources.resource_path(f"{modality.INTENSITY_MODELS}.0", "test")
    assert installed.parent != tmp_path  # not there yet: the installed package's
    (tmp_path / installed.name).symlink_to(installed)
    assert resources.resource_path(installed.name, "test") == tmp_path / installed.name
    monkeypatch.setattr(resources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingResourceError, match="RAYTSEG_TS_RESOURCES.*TotalSegmentator==2.18.0"):
        resources.resource_path(f"{modality.INTENSITY_MODELS}.1", "get-modality")


def test_normalized_median_statistics_are_totalsegmentators() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(-1000, 2000, size=(20, 18, 16)).astype(np.float64)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[2:9, 3:10, 4:8], labels[10:18, 5:15, 6:14] = 1, 2
    stats = basic_statistics(
        labels,
        image,
        (1.0, 1.0, 1.0),
        {1: "a", 2: "b"},
        aggregation="median",
        normalized=True,
        include_incomplete=True,
    )
    # totalsegmentator/statistics.py, get_basic_statistics with normalized_intensities=True:
    ct = image.astype(np.int16)
    ct = (ct - ct.min()) / (ct.max() - ct.min())
    for k, name in ((1, "a"), (2, "b")):
        assert stats[name]["intensity"] == np.median(ct[labels == k]).round(5)
    means = basic_statistics(
        labels, image, (1.0, 1.0, 1.0), {1: "a"}, normalized=True, include_incomplete=True
    )
    assert means["a"]["intensity"] == np.average(ct, weights=(labels == 1).astype(np.uint8)).round(5)


# --- task auto ------------------------------------------------------------------------


def _volume(name: str) -> Volume:
    return load_volume(REFERENCE / f"{name}.nii.gz", LIMITS)


def _roi_segmenter(intensity: float, calls: list[SegmentOptions]) -> Callable[..., Segmentation]:
    """A segmenter whose ROI statistics give every structure ``intensity``."""

    def segment(volume: Volume, options: SegmentOptions) -> Segmentation:
        calls.append(options)
        stats = {organ: {"intensity": intensity} for organ in modality.ROI_ORGANS}
        labels = np.zeros(volume.shape, dtype=np.uint8)
        return Segmentation(labels, volume.affine, volume.header, {}, options.task, statistics=stats)

    return segment


def test_task_auto_takes_a_dicom_tag_as_it_is() -> None:
    volume = dataclasses.replace(_volume("example_ct_sm"), modality="MR")
    evidence = modality.modality_evidence(volume)
    assert evidence == modality.ModalityEvidence("MR")  # no classifier asked
    assert modality.choose_task(evidence) == TaskChoice("total_mr", "MR", "DICOM Modality tag MR")


def test_task_auto_takes_the_intensity_classifiers_ct_when_the_image_holds_air() -> None:
    calls: list[SegmentOptions] = []
    choice = modality.task_choice(_volume("example_ct_sm"), _roi_segmenter(0.5, calls))
    assert choice == TaskChoice("total", "CT", "intensity classifier: ct (probability 1)")
    assert calls == []  # the ROI classifier was not needed


def test_task_auto_takes_an_mr_answer_of_the_intensity_classifier() -> None:
    data = np.random.default_rng(0).uniform(0, 900, size=(16, 16, 16))  # MR-like: no negative values
    volume = Volume(data, np.eye(4), nib.Nifti1Header())
    choice = modality.choose_task(modality.modality_evidence(volume))
    assert (choice.task, choice.modality) == ("total_mr", "MR")
    assert choice.reason.startswith("intensity classifier: mr")


def test_task_auto_asks_the_roi_classifier_when_a_ct_has_no_air() -> None:
    # The reference MR: the intensity classifier says ct, but its minimum is -47.
    volume = _volume("example_mr_sm")
    evidence = modality.modality_evidence(volume)
    assert evidence.intensity == modality.ModalityGuess("ct", 1.0)
    assert evidence.minimum > modality.CT_AIR_HU
    assert evidence.needs_roi
    with pytest.raises(ValueError, match="ROI classifier"):
        modality.choose_task(evidence)
    calls: list[SegmentOptions] = []
    choice = modality.task_choice(volume, _roi_segmenter(0.3, calls))
    assert calls == [modality.ROI_SEGMENTATION]
    roi = modality.classify([0.3] * len(modality.ROI_ORGANS), modality.ROI_MODELS)
    assert choice.task == {"ct": "total", "mr": "total_mr"}[roi.modality]
    assert choice.reason == (
        "intensity classifier: ct (probability 1), but no voxel is below -200 (minimum -47), "
        f"as in every CT in HU; ROI classifier: {roi.modality} (probability {roi.probability:g})"
    )
