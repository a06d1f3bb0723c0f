"""raytseg's DICOM-SEG equals TotalSegmentator 2.18's ``-ot dicom_seg`` for the same weights.

Both SEGs of the reference DICOM series are read with ``raytseg.testing.seg_masks``, which
places each frame by its own position: the segments must hold the same voxels, equal to
raytseg's multilabel NIfTI, with the same labels, SNOMED-CT codes and colours.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from raytseg.cli import main as raytseg_main
from raytseg.pipeline.labeltable import read_label_table
from raytseg.testing import seg_masks

pytestmark = pytest.mark.reference
FLAGS = ("--fast",)


def _their_seg(totalsegmentator: object, series: Path) -> Path:
    out = totalsegmentator.run(series, *FLAGS, "-ot", "dicom_seg")  # type: ignore[attr-defined]
    return out if out.is_file() else next(out.glob("*.dcm"))  # -o names the file or a folder


def _codes(ds: pydicom.Dataset) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    return {
        str(s.SegmentLabel): (
            str(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue),
            str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue),
            tuple(int(v) for v in s.RecommendedDisplayCIELabValue),
        )
        for s in ds.SegmentSequence
    }


def test_seg_matches_totalsegmentator_and_the_nifti(
    totalsegmentator: object,
    reference_data: Path,
    tiny_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    series = reference_data / "example_ct_dicom"
    theirs_path = _their_seg(totalsegmentator, series)
    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(tiny_weights))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    out = tmp_path / "out"
    args = [
        "segment",
        "-i",
        str(series),
        "-o",
        str(out),
        "-d",
        "cpu",
        "-q",
        *FLAGS,
        "-ot",
        "nifti",
        "dicom_seg",
    ]
    assert raytseg_main(args) == 0
    multilabel = nib.load(out / "segmentation.nii.gz")
    labels = np.asarray(multilabel.dataobj)
    ours = seg_masks((out / "segmentation_seg.dcm").read_bytes(), multilabel.affine, labels.shape)
    theirs = seg_masks(theirs_path.read_bytes(), multilabel.affine, labels.shape)
    present = {k: name for k, name in read_label_table(multilabel).items() if (labels == k).any()}
    assert len(present) >= 2  # synthetic weights must still find classes
    assert list(ours) == list(theirs) == list(present.values())  # same segments, same order
    for k, name in present.items():
        np.testing.assert_array_equal(ours[name], labels == k, err_msg=name)
        np.testing.assert_array_equal(theirs[name], labels == k, err_msg=name)
    ours_codes = _codes(pydicom.dcmread(out / "segmentation_seg.dcm"))
    theirs_codes = _codes(pydicom.dcmread(theirs_path))
    for name, (category, kind, colour) in theirs_codes.items():
        assert ours_codes[name][:2] == (category, kind), name
        # Same sRGB colour; highdicom's CIELab conversion and TotalSegmentator's differ in the
        # last digits: at most 8 of 65535 (0.012 %) per component, far below a visible step.
        assert np.abs(np.subtract(ours_codes[name][2], colour)).max() <= 8, name
