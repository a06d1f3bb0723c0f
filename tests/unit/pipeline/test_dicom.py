"""DICOM series from folders, zips and prefixes: equality with dicom2nifti, and every refusal."""

from __future__ import annotations

import io
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import (
    AmbiguousDicomError,
    ImageTooLargeError,
    InvalidImageError,
    UnreadableImageError,
    UnsafeArchiveError,
)
from raytseg.pipeline import dicom as dicom_module
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.records import Volume

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_DICOM = REPO.parent / "shared" / "data" / "totalseg-reference" / "example_ct_dicom"
needs_reference = pytest.mark.skipif(
    not EXAMPLE_DICOM.is_dir(), reason="TotalSegmentator example data not present"
)

LIMITS = LoadLimits(max_voxels=50_000_000, max_archive_bytes=64 * 2**20)


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    return buffer.getvalue()


def _dicom_members(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{p.name}": p.read_bytes() for p in sorted(EXAMPLE_DICOM.iterdir())}


def _assert_same_volume(a: Volume, b: Volume) -> None:
    assert a.data.dtype == b.data.dtype
    assert np.array_equal(a.data, b.data)
    assert np.array_equal(a.affine, b.affine)
    assert a.header.binaryblock == b.header.binaryblock


@pytest.fixture(scope="module")
def dicom_volume() -> Volume:
    if not EXAMPLE_DICOM.is_dir():
        pytest.skip("TotalSegmentator example data not present")
    return load_volume(EXAMPLE_DICOM, LIMITS)


@needs_reference
def test_dicom_folder_equals_dicom2nifti_on_disk(tmp_path: Path, dicom_volume: Volume) -> None:
    import dicom2nifti

    out = tmp_path / "converted_dcm.nii.gz"
    dicom2nifti.dicom_series_to_nifti(str(EXAMPLE_DICOM), str(out), reorient_nifti=True)
    ref = nib.load(out)
    expected = np.asanyarray(ref.dataobj)
    assert dicom_volume.data.dtype == expected.dtype
    assert np.array_equal(dicom_volume.data, expected)
    assert np.array_equal(dicom_volume.affine, ref.affine)
    assert dicom_volume.header.binaryblock == ref.header.binaryblock
    assert dicom_volume.modality == "CT"
    assert str(EXAMPLE_DICOM) in dicom_volume.source
    assert "DICOM" in dicom_volume.source


@needs_reference
def test_dicom_zip_file_and_bytes_equal_folder(tmp_path: Path, dicom_volume: Volume) -> None:
    raw = _zip_bytes({**_dicom_members("series/"), "series/notes.txt": b"not dicom", "DICOMDIR_like/": b""})
    from_file = load_volume(_write(tmp_path / "series.zip", raw), LIMITS)
    _assert_same_volume(from_file, dicom_volume)
    assert from_file.modality == "CT"
    _assert_same_volume(load_volume(raw, LIMITS), dicom_volume)


@needs_reference
def test_dicom_memory_prefix_equals_folder(memfs: tuple[Any, str], dicom_volume: Volume) -> None:
    fs, root = memfs
    for name, blob in _dicom_members().items():
        fs.pipe_file(f"{root}/dcm/{name}", blob)
    fs.pipe_file(f"{root}/dcm/readme.txt", b"hello")
    _assert_same_volume(load_volume(f"memory://{root}/dcm", LIMITS), dicom_volume)


@needs_reference
def test_dicom_memory_zip_object(memfs: tuple[Any, str], dicom_volume: Volume) -> None:
    fs, root = memfs
    fs.pipe_file(f"{root}/series.zip", _zip_bytes(_dicom_members()))
    _assert_same_volume(load_volume(f"memory://{root}/series.zip", LIMITS), dicom_volume)


def _split_series(source: Path, folder: Path, first: int) -> Path:
    """The reference slices as two series: the first ``first`` files, and the rest."""
    import pydicom

    shutil.copytree(source, folder)
    for i, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.1" if i < first else "1.2.826.0.1.2"
        ds.SeriesDescription = "first" if i < first else "second"
        ds.save_as(path)
    return folder


@needs_reference
def test_two_series_of_one_size_are_ambiguous(tmp_path: Path) -> None:
    with pytest.raises(AmbiguousDicomError) as info:
        load_volume(_split_series(EXAMPLE_DICOM, tmp_path / "mixed", 10), LIMITS)
    message = str(info.value)
    assert "1.2.826.0.1.1: first, 10 slices" in message
    assert "1.2.826.0.1.2: second, 10 slices" in message
    assert "Pass one series" in message


@needs_reference
def test_of_two_series_the_larger_is_segmented(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    volume = load_volume(_split_series(EXAMPLE_DICOM, tmp_path / "mixed", 12), LIMITS)
    assert volume.shape == (512, 512, 12)
    assert {ds.SeriesInstanceUID for ds in volume.series} == {"1.2.826.0.1.1"}
    assert "1.2.826.0.1.1: first, 12 slices" in caplog.text
    assert "Ignored:\n  - 1.2.826.0.1.2: second, 8 slices" in caplog.text


@needs_reference
def test_series_with_a_missing_slice(tmp_path: Path) -> None:
    folder = tmp_path / "gappy"
    shutil.copytree(EXAMPLE_DICOM, folder)
    sorted(folder.iterdir())[10].unlink()
    with pytest.raises(InvalidImageError, match="Pass one complete series"):
        load_volume(folder, LIMITS)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(UnreadableImageError, match="No DICOM image files"):
        load_volume(tmp_path, LIMITS)
    with pytest.raises(UnreadableImageError, match="No DICOM image files"):
        load_volume(_zip_bytes({"a.txt": b"hello"}), LIMITS)


@needs_reference
def test_dicom_voxel_limit_checked_before_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pixel data converted before the size check")

    monkeypatch.setattr(dicom_module, "_convert_dicom", fail)
    with pytest.raises(ImageTooLargeError, match="more than the limit"):
        load_volume(EXAMPLE_DICOM, LoadLimits(max_voxels=512 * 512 * 20 - 1, max_archive_bytes=2**30))


# --- unsafe archives -----------------------------------------------------------------


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (_zip_bytes({"/etc/slice.dcm": b"x"}), "absolute path"),
        (_zip_bytes({"C:/slice.dcm": b"x"}), "absolute path"),
        (_zip_bytes({"a/../../slice.dcm": b"x"}), r"'\.\.'"),
        (_zip_bytes({"a\\..\\slice.dcm": b"x"}), r"'\.\.'"),
        (_symlink_zip(), "symbolic link"),
        (_zip_bytes({"a.dcm": b"\x00" * 3000, "b.dcm": b"\x00" * 3000}), "expands to 6000 bytes"),
    ],
    ids=["absolute", "drive", "dotdot", "backslash-dotdot", "symlink", "too-big"],
)
def test_unsafe_zips(tmp_path: Path, raw: bytes, phrase: str) -> None:
    limits = LoadLimits(max_voxels=10**6, max_archive_bytes=5000)
    with pytest.raises(UnsafeArchiveError, match=phrase):
        load_volume(raw, limits)
    with pytest.raises(UnsafeArchiveError, match=phrase):
        load_volume(_write(tmp_path / "unsafe.zip", raw), limits)


def test_lying_zip_header_never_expands_past_it() -> None:
    raw = bytearray(_zip_bytes({"a.dcm": b"\x00" * 100_000}))
    # Declare 10 bytes in the local header and the central directory; the data says 100 kB.
    for signature, offset in [(b"PK\x03\x04", 22), (b"PK\x01\x02", 24)]:
        at = raw.index(signature) + offset
        raw[at : at + 4] = (10).to_bytes(4, "little")
    with pytest.raises(UnreadableImageError, match="Re-create the zip"):
        load_volume(bytes(raw), LoadLimits(max_voxels=10**6, max_archive_bytes=1000))
