"""-r/--radiomics on small synthetic images: what each mask gets, and the refusals.

The numbers themselves are compared with TotalSegmentator's on the reference CT
(tests/reference/test_radiomics_parity.py).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raytseg.cli import main
from raytseg.errors import InvalidOptionError, MissingResourceError
from raytseg.options import split_options
from raytseg.pipeline import radiomics
from raytseg.pipeline.export import nifti_gz_bytes, output_files
from raytseg.pipeline.records import OutputOptions, Segmentation, Volume

SHAPE = (24, 22, 20)


def _volume() -> Volume:
    rng = np.random.default_rng(0)
    data = rng.integers(-200, 300, size=SHAPE).astype(np.int16)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    return Volume(data, affine, nib.Nifti1Image(data, affine).header)


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[4:16, 5:15, 3:12] = 1
    labels[17:22, 16:21, 13:18] = 2
    return labels


def _mask(labels: np.ndarray, volume: Volume) -> bytes:
    return nifti_gz_bytes(nib.Nifti1Image(labels.astype(np.uint8), volume.affine))


def test_each_mask_file_gets_shape_and_first_order_features_by_name() -> None:
    volume, labels = _volume(), _labels()
    masks = [
        ("spleen.nii.gz", _mask(labels == 2, volume)),
        ("liver.nii.gz", _mask(labels == 1, volume)),
        ("kidney_left.nii.gz", _mask(labels == 3, volume)),  # empty
    ]
    features = json.loads(radiomics.radiomics_json(volume, masks))
    assert list(features) == ["kidney_left", "liver", "spleen"]  # file name order
    liver = features["liver"]
    assert {k.split("_")[0] for k in liver} == {"shape", "firstorder"}
    assert liver["shape_VoxelVolume"] > features["spleen"]["shape_VoxelVolume"] > 0
    assert all(round(v, 4) == v for v in liver.values())
    assert features["kidney_left"] == dict.fromkeys(radiomics.standard_features(), 0.0)
    assert len(radiomics.standard_features()) == 107
    assert radiomics.standard_features()[:2] == ("shape_Elongation", "shape_Flatness")


def test_a_failing_mask_gets_zeros_and_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    volume = _volume()

    class Failing:
        def execute(self, image: str, mask: str) -> None:
            raise ValueError("mask too small after resampling")

    monkeypatch.setattr(radiomics, "_extractor", Failing)
    with caplog.at_level(logging.WARNING, logger=radiomics.__name__):
        features = radiomics.radiomics_features(volume, [("liver.nii.gz", _mask(_labels() == 1, volume))])
    assert features == {"liver": dict.fromkeys(radiomics.standard_features(), 0.0)}
    assert "liver.nii.gz" in caplog.text
    assert "too small" in caplog.text


def test_the_export_computes_them_from_the_class_files_it_writes() -> None:
    volume = _volume()
    seg = Segmentation(_labels(), volume.affine, volume.header.copy(), {1: "liver", 2: "spleen"}, "total")
    seg.header.set_data_dtype(np.uint8)
    files = dict(output_files(seg, volume, OutputOptions(radiomics=True)))
    assert list(files) == ["liver.nii.gz", "spleen.nii.gz", radiomics.FILE_NAME]
    masks = [(n, d) for n, d in files.items() if n.endswith(".nii.gz")]
    assert files[radiomics.FILE_NAME] == radiomics.radiomics_json(volume, masks)


NOT_PER_CLASS = [
    {"radiomics": True, "ml": True},
    {"radiomics": True, "output_type": "dicom_seg"},
    {"radiomics": True, "skip_saving": True},
]


@pytest.mark.parametrize("values", NOT_PER_CLASS)
def test_radiomics_needs_the_class_files(values: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionError, match="per-class mask files"):
        split_options(values)


def test_without_pyradiomics_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "radiomics", None)
    with pytest.raises(MissingResourceError, match=r"raytseg\[tools\]"):
        radiomics.radiomics_features(_volume(), [])


def test_stats_writes_radiomics_for_existing_masks(tmp_path: Path) -> None:
    volume = _volume()
    nib.save(nib.Nifti1Image(volume.data, volume.affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(_labels(), volume.affine), tmp_path / "seg.nii.gz")
    base = ["stats", "-i", str(tmp_path / "ct.nii.gz"), "--seg", str(tmp_path / "seg.nii.gz")]
    assert main([*base, "--radiomics", str(tmp_path / "r.json")]) == 0
    features = json.loads((tmp_path / "r.json").read_text())  # no label table: total's ids
    assert features["spleen"]["shape_VoxelVolume"] == pytest.approx(12 * 10 * 9 * 1.5 * 1.5 * 2.0, rel=0.2)
    assert features["kidney_right"]["shape_VoxelVolume"] > 0
    assert features["liver"] == dict.fromkeys(radiomics.standard_features(), 0.0)
    assert len(features) == 117
    assert not (tmp_path / "statistics.json").exists()
    assert main(base) == 1  # neither -o nor --radiomics
