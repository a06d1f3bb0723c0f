"""DICOM-SEG and RTSTRUCT outputs: decoded independently, they give back the labels voxel for
voxel, on the patient's correct side, for several slice orientations; every refusal."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from raytseg.errors import DicomOutputError, MissingResourceError
from raytseg.pipeline import coding
from raytseg.pipeline.axes import to_frames
from raytseg.pipeline.dicomgrid import slice_grid
from raytseg.pipeline.dicomseg import dicom_seg_bytes
from raytseg.pipeline.dicomsource import dicom_source
from raytseg.pipeline.export import DICOM_NAMES, check_output, write_segmentation
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.records import OutputOptions, Segmentation, Volume
from raytseg.pipeline.rtstruct import rtstruct_bytes
from raytseg.testing import seg_masks

REPO = Path(__file__).resolve().parents[3]
REFERENCE = REPO.parent / "shared" / "data" / "totalseg-reference"
EXAMPLE_DICOM = REFERENCE / "example_ct_dicom"
LIMITS = LoadLimits(max_voxels=50_000_000, max_archive_bytes=64 * 2**20)
LABELS = {1: "kidney_left", 2: "kidney_right", 5: "liver", 7: "aorta"}

pytestmark = pytest.mark.skipif(not EXAMPLE_DICOM.is_dir(), reason="reference DICOM series not present")


# --- series in several orientations, made from the reference one ------------------------

Edit = Callable[[Any], None]


def _rows_flipped(ds: Any) -> None:
    """Rows run posterior to anterior (column cosine negated), over the same extent."""
    ds.ImagePositionPatient[1] += (int(ds.Rows) - 1) * float(ds.PixelSpacing[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]


def _columns_flipped(ds: Any) -> None:
    """Columns run from the patient's left to right (the slice normal turns feet-ward)."""
    ds.ImagePositionPatient[0] += (int(ds.Columns) - 1) * float(ds.PixelSpacing[1])
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]


ORIENTATIONS: dict[str, Edit | None] = {
    "as stored": None,
    "rows flipped": _rows_flipped,
    "columns flipped": _columns_flipped,
}


@pytest.fixture(scope="module", params=sorted(ORIENTATIONS))
def series(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    edit = ORIENTATIONS[request.param]
    if edit is None:
        return EXAMPLE_DICOM
    folder = tmp_path_factory.mktemp("series")
    for path in sorted(EXAMPLE_DICOM.iterdir()):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def volume(series: Path) -> Volume:
    return load_volume(str(series), LIMITS)


def _sides(volume: Volume) -> Segmentation:
    """kidney_left on the patient's left (LPS x > 40 mm), kidney_right on the right, a
    liver block and a one-voxel aorta: an input whose mirror image is a different answer."""
    i, j, k = np.indices(volume.shape)
    world = (
        np.einsum("ab,bijk->aijk", volume.affine[:3, :3], np.stack([i, j, k]))
        + volume.affine[:3, 3, None, None, None]
    )
    lps_x = -world[0]
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[(lps_x > 40) & (k > 3)] = 1
    labels[lps_x < -60] = 2
    labels[(np.abs(lps_x) < 20) & (world[1] > 0) & (k < 10)] = 5
    centre = tuple(s // 2 for s in volume.shape)
    labels[centre] = 7
    assert set(np.unique(labels)) == {0, *LABELS}
    return Segmentation(labels, volume.affine, volume.header, LABELS, "total")


# --- independent decoders --------------------------------------------------------------


def _seg_bytes(seg: Segmentation, volume: Volume, kind: Any) -> bytes:
    return dicom_seg_bytes(seg, dicom_source(seg, volume.series), kind)


def _rt_bytes(seg: Segmentation, volume: Volume) -> bytes:
    return rtstruct_bytes(seg, dicom_source(seg, volume.series))


def _decode_seg(data: bytes, volume: Volume) -> dict[str, np.ndarray]:
    return seg_masks(data, volume.affine, volume.shape)


@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_seg_decodes_to_the_labels_on_the_right_side(volume: Volume, kind: str) -> None:
    seg = _sides(volume)
    masks = _decode_seg(_seg_bytes(seg, volume, kind), volume)
    assert sorted(masks) == sorted(LABELS.values())
    for label, name in LABELS.items():
        np.testing.assert_array_equal(masks[name], seg.labels == label, err_msg=name)


def test_seg_segments_carry_totalsegmentator_codes_and_raytseg_identity(volume: Volume) -> None:
    ds = pydicom.dcmread(io.BytesIO(_seg_bytes(_sides(volume), volume, "binary")))
    liver = next(s for s in ds.SegmentSequence if s.SegmentLabel == "liver")
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == coding.coding_of("liver").type.value
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert liver.SegmentAlgorithmName == "raytseg"
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3, 4]
    assert ds.Manufacturer == "raytseg"
    referenced = {
        str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert len(referenced) == len(volume.series)
    assert "" not in referenced


def test_frames_are_the_source_pixels(volume: Volume, series: Path) -> None:
    grid = slice_grid(volume.series, volume.affine, volume.shape)
    frames = to_frames(volume.data, grid)
    by_position = {
        tuple(map(float, ds.ImagePositionPatient)): ds
        for ds in map(pydicom.dcmread, sorted(series.iterdir()))
    }
    for frame, header in zip(frames, grid.slices, strict=True):
        ds = by_position[tuple(map(float, header.ImagePositionPatient))]
        pixels = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(frame, pixels)


def _contour_masks(data: bytes, volume: Volume) -> dict[str, np.ndarray]:
    """rt-utils' own reader, for each ROI, back on the volume's grid."""
    from rt_utils.image_helper import create_series_mask_from_contour_sequence

    ds = pydicom.dcmread(io.BytesIO(data))
    source = dicom_source(_sides(volume), volume.series)
    grid = slice_grid(volume.series, volume.affine, volume.shape)
    masks = {}
    for roi, info in zip(ds.ROIContourSequence, ds.StructureSetROISequence, strict=True):
        frames = create_series_mask_from_contour_sequence(list(source.slices), roi.ContourSequence)
        empty = np.zeros(volume.shape, dtype=bool)
        to_frames(empty, grid)[...] = frames.transpose(2, 0, 1)  # a view: writes into ``empty``
        masks[str(info.ROIName)] = empty
    return masks


def test_rtstruct_contours_give_back_the_masks_on_the_right_side(volume: Volume) -> None:
    seg = _sides(volume)
    data = _rt_bytes(seg, volume)
    masks = _contour_masks(data, volume)
    for label in (1, 2, 5):
        truth = seg.labels == label
        dice = 2 * (masks[LABELS[label]] & truth).sum() / (masks[LABELS[label]].sum() + truth.sum())
        assert dice >= 0.98, (LABELS[label], dice)
    ds = pydicom.dcmread(io.BytesIO(data))
    for roi, info in zip(ds.ROIContourSequence, ds.StructureSetROISequence, strict=True):
        points = np.concatenate([np.reshape(c.ContourData, (-1, 3)) for c in roi.ContourSequence])
        if info.ROIName == "kidney_left":
            assert points[:, 0].min() > 39  # patient's left: LPS x > 0
        if info.ROIName == "kidney_right":
            assert points[:, 0].max() < -59
        assert all(int(c.NumberOfContourPoints) >= 3 for c in roi.ContourSequence), info.ROIName


def test_one_voxel_and_one_line_structures_become_polygons_around_their_pixels(volume: Volume) -> None:
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[100, 200, 5] = 7  # one voxel
    labels[300:320, 50, 6] = 5  # a straight line: OpenCV's trace has two points
    seg = Segmentation(labels, volume.affine, volume.header, LABELS, "total")
    data = _rt_bytes(seg, volume)
    ds = pydicom.dcmread(io.BytesIO(data))
    contours = [c for roi in ds.ROIContourSequence for c in roi.ContourSequence]
    assert len(contours) == 2
    assert all(int(c.NumberOfContourPoints) == 4 for c in contours)
    masks = _contour_masks(data, volume)
    assert masks["aorta"][100, 200, 5]
    assert masks["liver"][300:320, 50, 6].all()


# --- refusals, names, UIDs, validation ----------------------------------------------------


def test_nifti_input_is_refused_before_any_model_runs() -> None:
    volume = load_volume(str(REFERENCE / "example_ct_sm.nii.gz"), LIMITS)
    with pytest.raises(DicomOutputError, match="DICOM input"):
        check_output(OutputOptions(output_type=("nifti", "dicom_seg")), volume)
    check_output(OutputOptions(output_type=("dicom_seg",), skip_saving=True), volume)  # nothing to write


def test_a_series_off_the_image_grid_is_refused(volume: Volume) -> None:
    shifted = volume.affine.copy()
    shifted[:3, 3] += 0.5 * volume.affine[:3, 0]  # half a voxel: resampled, not the slices
    with pytest.raises(DicomOutputError, match="one to one"):
        slice_grid(volume.series, shifted, volume.shape)


def test_an_empty_segmentation_has_no_seg(volume: Volume) -> None:
    empty = Segmentation(np.zeros(volume.shape, np.uint8), volume.affine, volume.header, LABELS, "total")
    with pytest.raises(DicomOutputError, match="at least one segment"):
        _seg_bytes(empty, volume, "binary")


def test_without_the_totalsegmentator_mapping_dicom_output_is_refused(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raytseg import resources

    coding.class_codings.cache_clear()
    monkeypatch.setattr(resources.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("RAYTSEG_TS_RESOURCES", raising=False)
    try:
        with pytest.raises(MissingResourceError, match="pip install --no-deps TotalSegmentator"):
            check_output(OutputOptions(output_type=("dicom_seg",)), volume)
    finally:
        monkeypatch.undo()
        coding.class_codings.cache_clear()


def test_uids_depend_on_the_labels_only(volume: Volume) -> None:
    seg = _sides(volume)
    first = pydicom.dcmread(io.BytesIO(_seg_bytes(seg, volume, "labelmap")))
    again = pydicom.dcmread(io.BytesIO(_seg_bytes(seg, volume, "labelmap")))
    other = Segmentation(
        np.where(seg.labels == 7, 0, seg.labels).astype(np.uint8), seg.affine, seg.header, LABELS, "total"
    )
    changed = pydicom.dcmread(io.BytesIO(_seg_bytes(other, volume, "labelmap")))
    assert first.SOPInstanceUID == again.SOPInstanceUID != changed.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.StudyInstanceUID == again.StudyInstanceUID != ""


def test_output_types_are_written_in_order_and_o_may_name_the_dicom_file(
    volume: Volume, tmp_path: Path
) -> None:
    seg = _sides(volume)
    both = OutputOptions(output_type=("dicom_seg", "nifti", "dicom_rtstruct"), dicom_seg_type="labelmap")
    written = write_segmentation(seg, volume, str(tmp_path / "folder"), both)
    assert [Path(p).name for p in written] == [
        DICOM_NAMES["dicom_seg"],
        "segmentation.nii.gz",
        DICOM_NAMES["dicom_rtstruct"],
    ]
    named = write_segmentation(
        seg, volume, str(tmp_path / "seg.dcm"), OutputOptions(output_type=("dicom_seg",), preview=True)
    )
    assert [Path(p).name for p in named] == ["seg.dcm", "preview_total.png"]
    assert pydicom.dcmread(tmp_path / "seg.dcm").Modality == "SEG"


def _dciodvfy() -> str | None:
    tool = shutil.which("dciodvfy")
    if tool is None and os.environ.get("RAYTSEG_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail("dciodvfy (Debian package dicom3tools) is required here: scripts/setup-ci-tools.sh")
    return tool


@pytest.mark.parametrize("kind", ["dicom_seg", "dicom_rtstruct"])
def test_dciodvfy_finds_no_error(volume: Volume, kind: str, tmp_path: Path) -> None:
    tool = _dciodvfy()
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    seg = _sides(volume)
    data = _seg_bytes(seg, volume, "binary") if kind == "dicom_seg" else _rt_bytes(seg, volume)
    path = tmp_path / "out.dcm"
    path.write_bytes(data)
    report = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
