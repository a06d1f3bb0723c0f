"""Awkward DICOM series, built from the reference series: each is segmented correctly or refused.

Each ``make_*`` function writes a case into a new folder from copies of the reference slices
(pydicom edits only); the README's table of what raytseg and TotalSegmentator 2.18 do with
each case was made from these same builders.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import InconsistentDicomError
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.records import Volume

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_DICOM = REPO.parent / "shared" / "data" / "totalseg-reference" / "example_ct_dicom"
pytestmark = pytest.mark.skipif(
    not EXAMPLE_DICOM.is_dir(), reason="TotalSegmentator example data not present"
)

LIMITS = LoadLimits(max_voxels=50_000_000, max_archive_bytes=64 * 2**20)
TILT_DEGREES = 15.0
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


# --- case builders (also used to record TotalSegmentator's behaviour) -----------------


def _slices(folder: Path) -> list[tuple[Path, Any]]:
    """The folder's slices, head first (highest z first, as the reference files are named)."""
    import pydicom

    items = [(p, pydicom.dcmread(p)) for p in sorted(folder.iterdir())]
    return sorted(items, key=lambda item: -float(item[1].ImagePositionPatient[2]))


def _copy(dest: Path) -> Path:
    shutil.copytree(EXAMPLE_DICOM, dest)
    return dest


def make_tilted(dest: Path, degrees: float = TILT_DEGREES) -> Path:
    """Gantry tilt as GE writes it: axial slices whose origin moves along y with z."""
    shift = 2.0 * math.tan(math.radians(degrees))
    for i, (path, ds) in enumerate(_slices(_copy(dest))):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + i * shift, z]
        ds.GantryDetectorTilt = degrees
        ds.save_as(path)
    return dest


def make_jittered(dest: Path) -> Path:
    """Every slice present, positions off the regular 2 mm grid by up to 0.2 mm."""
    for i, (path, ds) in enumerate(_slices(_copy(dest))):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + (0.2 if i % 2 else -0.15) * (0 < i < 19)]
        ds.save_as(path)
    return dest


def make_missing_slice(dest: Path) -> Path:
    """The 11th of 20 slices is gone: one 4 mm step among 2 mm ones."""
    _slices(_copy(dest))[10][0].unlink()
    return dest


def make_with_copy(dest: Path) -> Path:
    """One slice twice, under another file name (dicom2nifti drops such copies)."""
    path = _slices(_copy(dest))[5][0]
    shutil.copy(path, path.with_name(f"copy.{path.name}"))
    return dest


def make_two_series(dest: Path) -> Path:
    """The 20-slice series plus a second reconstruction of 8 of its slices (other pixels)."""
    for path, ds in _slices(_copy(dest)):
        ds.SeriesInstanceUID, ds.SeriesDescription = "1.2.826.0.1.1", "CT Body 3.0"
        ds.save_as(path)
    for path, ds in _slices(dest)[4:12]:
        ds.SeriesInstanceUID, ds.SeriesDescription = "1.2.826.0.1.2", "CT Lung 3.0"
        _invert_pixels(ds)
        ds.save_as(path.with_name(f"lung.{path.name}"))
    return dest


def _invert_pixels(ds: Any) -> None:
    pixels = ds.pixel_array
    ds.decompress()
    ds.PixelData = (4095 - np.minimum(pixels, 4095)).astype(pixels.dtype).tobytes()


def make_with_localizer(dest: Path, *, own_series: bool = False) -> Path:
    """The series plus a coronal scout (ImageType LOCALIZER), in the series or in its own."""
    path, ds = _slices(_copy(dest))[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-249.5, 0.0, -600.0]
    ds.InstanceNumber = 1
    if own_series:
        ds.SeriesInstanceUID, ds.SeriesDescription = "1.2.826.0.1.9", "Topogram 0.6"
    ds.save_as(path.with_name("scout.dcm"))
    return dest


def make_multiframe(dest: Path, sop_class: str = ENHANCED_CT) -> Path:
    """The 20 slices as one multi-frame instance (highdicom's legacy conversion), labelled
    with ``sop_class`` (Enhanced CT by default; highdicom writes Legacy Converted Enhanced CT)."""
    import highdicom
    from pydicom.uid import CTImageStorage, generate_uid

    dest.mkdir()
    datasets = [ds for _, ds in _slices(EXAMPLE_DICOM)]
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    uids["FrameOfReferenceUID"] = generate_uid()
    for ds in datasets:
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        for keyword, uid in uids.items():
            setattr(ds, keyword, uid)
        ds.decompress()
    image = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = sop_class
    image.save_as(dest / "enhanced.dcm")
    return dest


CASES: dict[str, Callable[[Path], Path]] = {
    "tilted": make_tilted,
    "jittered": make_jittered,
    "missing_slice": make_missing_slice,
    "copied_slice": make_with_copy,
    "two_series": make_two_series,
    "localizer": make_with_localizer,
    "localizer_series": lambda dest: make_with_localizer(dest, own_series=True),
    "multiframe": make_multiframe,
}


# --- tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Volume:
    return load_volume(EXAMPLE_DICOM, LIMITS)


def _assert_same_volume(a: Volume, b: Volume) -> None:
    assert a.data.dtype == b.data.dtype
    assert np.array_equal(a.data, b.data)
    assert np.array_equal(a.affine, b.affine)
    assert a.header.binaryblock == b.header.binaryblock


def _settings() -> dict[str, Any]:
    import dicom2nifti.settings as settings

    names = ["validate_orthogonal", "validate_slice_increment", "resample", "resample_padding"]
    return {name: getattr(settings, name) for name in names}


def test_tilted_series_is_resampled_as_dicom2nifti_resamples_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dicom2nifti
    import dicom2nifti.settings as settings

    folder = make_tilted(tmp_path / "tilted")
    before = _settings()
    volume = load_volume(folder, LIMITS)
    assert _settings() == before  # dicom2nifti's globals are as they were
    assert "Gantry tilt of 15.0 degrees" in caplog.text
    assert len(volume.series) == 20
    # dicom2nifti's own tilt correction, written to disk as TotalSegmentator would read it
    settings.disable_validate_orthogonal()
    settings.enable_resampling()
    settings.resample_padding = -1024
    try:
        dicom2nifti.dicom_series_to_nifti(str(folder), str(tmp_path / "ref.nii.gz"), reorient_nifti=True)
    finally:
        settings.enable_validate_orthogonal()
        settings.disable_resampling()
        settings.resample_padding = before["resample_padding"]
    ref = nib.load(tmp_path / "ref.nii.gz")
    assert volume.data.min() == -1024  # padded with air
    assert np.array_equal(volume.data, np.asanyarray(ref.dataobj))
    assert np.array_equal(volume.affine, ref.affine)
    assert volume.header.binaryblock == ref.header.binaryblock


def _body_centroid_lps(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.asarray(points[values > -500].mean(axis=0))


def test_tilted_series_lands_where_its_slices_are(tmp_path: Path) -> None:
    """The body's centre in patient coordinates, from the tilted slices themselves and from
    the corrected volume, agree within a millimetre (a mirrored or unshifted volume is off by 5+)."""
    folder = make_tilted(tmp_path / "tilted")
    points, values = [], []
    for _, ds in _slices(folder):
        rows, cols = np.mgrid[0 : ds.Rows : 8, 0 : ds.Columns : 8]
        row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
        spacing = [float(v) for v in ds.PixelSpacing]
        lps = np.array(ds.ImagePositionPatient, float) + cols[..., None] * spacing[1] * row_dir
        points.append((lps + rows[..., None] * spacing[0] * col_dir).reshape(-1, 3))
        values.append(
            (ds.pixel_array[::8, ::8] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).ravel()
        )
    expected = _body_centroid_lps(np.concatenate(points), np.concatenate(values))
    volume = load_volume(folder, LIMITS)
    steps = (4, 4, 1)  # every slice, as above
    axes = (np.arange(0, n, step) for n, step in zip(volume.shape, steps, strict=True))
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    got = _body_centroid_lps(ras * [-1, -1, 1], volume.data[tuple(ijk.T)])
    assert np.allclose(got, expected, atol=1.0), (got, expected)


def test_jittered_positions_are_placed_on_the_regular_grid(
    tmp_path: Path, reference: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    volume = load_volume(make_jittered(tmp_path / "jittered"), LIMITS)
    _assert_same_volume(volume, reference)
    assert "deviate by up to 0.20 mm from a regular spacing of 2.000 mm" in caplog.text
    assert len(volume.series) == 20


def test_missing_slice_is_refused_with_where(tmp_path: Path) -> None:
    with pytest.raises(InconsistentDicomError) as info:
        load_volume(make_missing_slice(tmp_path / "gappy"), LIMITS)
    message = str(info.value)
    assert "mostly 2.000 mm, but 4.000 mm between instance 278" in message
    assert "Pass one complete series" in message


def test_positions_too_far_off_a_grid_are_refused(tmp_path: Path) -> None:
    folder = make_jittered(tmp_path / "jittered")
    path, ds = _slices(folder)[7]
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.9]
    ds.save_as(path)
    with pytest.raises(InconsistentDicomError, match="slice spacing of the series is inconsistent"):
        load_volume(folder, LIMITS)


def test_a_copied_slice_is_left_out(tmp_path: Path, reference: Volume) -> None:
    volume = load_volume(make_with_copy(tmp_path / "copied"), LIMITS)
    _assert_same_volume(volume, reference)
    assert len(volume.series) == 20


def test_the_largest_series_is_chosen_and_the_others_named(
    tmp_path: Path, reference: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    volume = load_volume(make_two_series(tmp_path / "two"), LIMITS)
    assert np.array_equal(volume.data, reference.data)
    assert np.array_equal(volume.affine, reference.affine)
    assert {ds.SeriesInstanceUID for ds in volume.series} == {"1.2.826.0.1.1"}
    assert len(volume.series) == 20
    assert "segmenting the largest usable one" in caplog.text
    assert "1.2.826.0.1.2: CT Lung 3.0, 8 slices" in caplog.text


@pytest.mark.parametrize("own_series", [False, True], ids=["in-series", "own-series"])
def test_localizers_are_left_out(tmp_path: Path, reference: Volume, own_series: bool) -> None:
    volume = load_volume(make_with_localizer(tmp_path / "scout", own_series=own_series), LIMITS)
    _assert_same_volume(volume, reference)
    assert len(volume.series) == 20
    assert not any("LOCALIZER" in ds.ImageType for ds in volume.series)


@pytest.mark.parametrize(
    "sop_class", [ENHANCED_CT, "1.2.840.10008.5.1.4.1.1.2.2"], ids=["enhanced", "legacy"]
)
def test_multiframe_ct_equals_its_single_frame_series(
    tmp_path: Path, reference: Volume, sop_class: str
) -> None:
    """Rescaled to HU like the slices (dicom2nifti alone leaves the stored values: +1024)."""
    volume = load_volume(make_multiframe(tmp_path / "mf", sop_class), LIMITS)
    assert volume.data.dtype == reference.data.dtype
    assert np.array_equal(volume.data, reference.data)
    # equal, but the header's srow holds a -0.0 where the slices give 0.0
    assert np.array_equal(volume.affine, reference.affine)
    assert [ds.SOPClassUID for ds in volume.series] == [sop_class]
    assert volume.modality == "CT"


def test_several_multiframe_instances_in_a_series_are_refused(tmp_path: Path) -> None:
    folder = make_multiframe(tmp_path / "mf")
    shutil.copy(folder / "enhanced.dcm", folder / "again.dcm")
    with pytest.raises(InconsistentDicomError, match="Pass the one multi-frame instance"):
        load_volume(folder, LIMITS)


def _two_slices_at_one_position(dest: Path) -> Path:
    path, ds = _slices(_copy(dest))[5]
    _invert_pixels(ds)
    ds.save_as(path.with_name("other.dcm"))
    return dest


def _two_orientations(dest: Path) -> Path:
    for path, ds in _slices(_copy(dest))[10:]:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.save_as(path)
    return dest


def _two_gappy_series(dest: Path) -> Path:
    for i, (path, ds) in enumerate(_slices(_copy(dest))):
        ds.SeriesInstanceUID = "1.2.826.0.1.1" if i < 10 else "1.2.826.0.1.2"
        ds.save_as(path)
    for i in (3, 15):
        _slices(dest)[i][0].unlink()
    return dest


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (_two_slices_at_one_position, "but 0.000 mm between instance 272"),
        (lambda dest: make_tilted(dest, 40.0), "40.0 degrees off their normal"),
        (_two_orientations, "mixes 2 slice orientations"),
        (_two_gappy_series, "2 DICOM series and none of them forms a volume"),
    ],
    ids=["same-position", "tilt-40", "two-orientations", "no-usable-series"],
)
def test_stacks_that_are_no_volume_are_refused(
    tmp_path: Path, make: Callable[[Path], Path], phrase: str
) -> None:
    with pytest.raises(InconsistentDicomError, match=phrase):
        load_volume(make(tmp_path / "case"), LIMITS)


@pytest.mark.parametrize(("make", "refusal"), [(make_tilted, "one to one"), (make_multiframe, "multi-frame")])
def test_dicom_outputs_of_resampled_or_multiframe_input_are_refused_before_segmenting(
    tmp_path: Path, make: Callable[[Path], Path], refusal: str
) -> None:
    from raytseg.errors import DicomOutputError
    from raytseg.pipeline.export import check_output
    from raytseg.pipeline.records import OutputOptions

    volume = load_volume(str(make(tmp_path / "series")), LIMITS)
    with pytest.raises(DicomOutputError, match=refusal):
        check_output(OutputOptions(output_type=("dicom_seg",)), volume)
