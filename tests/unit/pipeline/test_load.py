"""Load stage: every accepted input, equality with TotalSegmentator's readers, every refusal."""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.config import Settings
from raytseg.errors import (
    AmbiguousDicomError,
    ImageTooLargeError,
    InvalidImageError,
    StorageError,
    UnreadableImageError,
    UnsafeArchiveError,
)
from raytseg.pipeline import load as load_module
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.records import Volume

REPO = Path(__file__).resolve().parents[3]
REFERENCE = REPO.parent / "shared" / "data" / "totalseg-reference"
EXAMPLE_CT = REFERENCE / "example_ct_sm.nii.gz"
EXAMPLE_DICOM = REFERENCE / "example_ct_dicom"
needs_reference = pytest.mark.skipif(
    not (EXAMPLE_CT.is_file() and EXAMPLE_DICOM.is_dir()), reason="TotalSegmentator example data not present"
)

LIMITS = LoadLimits(max_voxels=50_000_000, max_archive_bytes=64 * 2**20)


# --- helpers -------------------------------------------------------------------------


def _image(
    shape: tuple[int, ...] = (4, 5, 6), dtype: Any = np.int16, zooms: tuple[float, ...] = (1.0, 2.0, 3.0)
):
    data = np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)
    affine = np.diag([*zooms[:3], 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    return nib.Nifti1Image(data, affine)


def _header_edit(raw: bytes, edit: Callable[[nib.Nifti1Header], None]) -> bytes:
    """Change fields of a stored NIfTI-1 header in place, unchecked (nibabel would fix them)."""
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    edit(header)
    return header.binaryblock + raw[348:]


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


@pytest.fixture
def memfs() -> Iterator[tuple[Any, str]]:
    """fsspec's memory filesystem with a private root, removed afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/raytseg-load-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="module")
def dicom_volume() -> Volume:
    if not EXAMPLE_DICOM.is_dir():
        pytest.skip("TotalSegmentator example data not present")
    return load_volume(EXAMPLE_DICOM, LIMITS)


# --- limits --------------------------------------------------------------------------


def test_limits_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        totalseg_home=tmp_path,
        weights_dir=tmp_path,
        cache_dir=tmp_path,
        max_voxels=123,
        max_archive_bytes=456,
    )
    assert LoadLimits.from_settings(settings) == LoadLimits(max_voxels=123, max_archive_bytes=456)


# --- NIfTI ---------------------------------------------------------------------------


@needs_reference
def test_example_ct_matches_nib_load() -> None:
    ref = nib.load(EXAMPLE_CT)
    vol = load_volume(str(EXAMPLE_CT), LIMITS)
    expected = np.asanyarray(ref.dataobj)
    assert vol.data.dtype == expected.dtype == np.int16
    assert np.array_equal(vol.data, expected)
    assert np.array_equal(vol.affine, ref.affine)
    assert vol.header.binaryblock == ref.header.binaryblock
    assert vol.header is not ref.header
    assert vol.source == str(EXAMPLE_CT)
    assert vol.modality is None


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_and_unscaled_nifti_like_nib_load(tmp_path: Path, suffix: str) -> None:
    scaled = _image()
    scaled.header.set_slope_inter(2.0, -1.0)
    for name, img in [("plain", _image()), ("scaled", scaled)]:
        path = tmp_path / f"{name}{suffix}"
        nib.save(img, path)
        ref = nib.load(path)
        vol = load_volume(path, LIMITS)
        assert vol.data.dtype == np.asanyarray(ref.dataobj).dtype
        assert np.array_equal(vol.data, np.asanyarray(ref.dataobj))
        assert vol.header.binaryblock == ref.header.binaryblock
        assert vol.zooms == (1.0, 2.0, 3.0)
    assert load_volume(tmp_path / f"scaled{suffix}", LIMITS).data.dtype == np.float64
    assert load_volume(tmp_path / f"plain{suffix}", LIMITS).data.dtype == np.int16


def test_bytes_input_plain_and_gzipped() -> None:
    img = _image()
    raw = img.to_bytes()
    for blob in (raw, gzip.compress(raw)):
        vol = load_volume(blob, LIMITS)
        assert np.array_equal(vol.data, img.get_fdata())
        assert np.array_equal(vol.affine, img.affine)
        assert vol.source == "<bytes>"


def test_in_memory_image() -> None:
    img = _image(dtype=np.float32)
    vol = load_volume(img, LIMITS)
    assert vol.data.dtype == np.float32
    assert np.array_equal(vol.data, img.dataobj)
    assert vol.header.binaryblock == img.header.binaryblock
    assert vol.source == "<memory>"


def test_nifti2_is_read_into_a_nifti1_header(tmp_path: Path) -> None:
    img = _image()
    path = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(img.dataobj, img.affine), path)
    vol = load_volume(path, LIMITS)
    assert isinstance(vol.header, nib.Nifti1Header)
    assert np.array_equal(vol.data, img.dataobj)
    assert vol.zooms == (1.0, 2.0, 3.0)


def test_memory_uri(memfs: tuple[Any, str]) -> None:
    fs, root = memfs
    img = _image()
    fs.pipe_file(f"{root}/ct.nii.gz", gzip.compress(img.to_bytes()))
    vol = load_volume(f"memory://{root}/ct.nii.gz", LIMITS)
    assert np.array_equal(vol.data, img.dataobj)
    assert vol.source == f"memory://{root}/ct.nii.gz"


def test_missing_uri_is_a_storage_error(memfs: tuple[Any, str]) -> None:
    _fs, root = memfs
    with pytest.raises(StorageError, match="does not exist"):
        load_volume(f"memory://{root}/absent.nii.gz", LIMITS)


@pytest.mark.parametrize("shape", [(4, 5, 6, 1), (4, 5, 6, 1, 1)])
def test_trailing_singleton_dims_are_squeezed(tmp_path: Path, shape: tuple[int, ...]) -> None:
    img = _image(shape)
    path = tmp_path / "ct4d.nii.gz"
    nib.save(img, path)
    vol = load_volume(path, LIMITS)
    assert vol.shape == (4, 5, 6)
    assert vol.data.ndim == 3
    assert np.array_equal(vol.data, np.asanyarray(img.dataobj).reshape(4, 5, 6))
    # as TotalSegmentator: a fresh header built from voxels and affine
    assert vol.header.get_data_shape() == (4, 5, 6)
    assert vol.zooms == (1.0, 2.0, 3.0)


# --- bad NIfTI -----------------------------------------------------------------------


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz", LIMITS)


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda raw: b"", "is empty"),
        (lambda raw: b"hello, this is not an image" * 40, "neither a NIfTI"),
        (lambda raw: gzip.compress(raw)[: len(gzip.compress(raw)) // 2], "truncated"),
        (lambda raw: gzip.compress(b"not a nifti at all" * 40), "neither a NIfTI"),
        (lambda raw: b"\x1f\x8b" + b"\x00" * 400, "gzip"),
        (lambda raw: raw[:-200], "truncated"),
        (lambda raw: raw[:200], "truncated"),
        (lambda raw: b"PK\x03\x04 but not really a zip" * 10, "not a readable zip"),
    ],
    ids=[
        "empty",
        "text",
        "truncated-gzip",
        "gzip-of-text",
        "bad-gzip",
        "truncated-nii",
        "short-header",
        "bad-zip",
    ],
)
def test_unreadable_inputs(tmp_path: Path, make: Callable[[bytes], bytes], phrase: str) -> None:
    raw = make(_image((10, 10, 10)).to_bytes())
    with pytest.raises(UnreadableImageError, match=phrase):
        load_volume(_write(tmp_path / "bad.nii.gz", raw), LIMITS)
    with pytest.raises(UnreadableImageError, match=phrase):
        load_volume(raw, LIMITS)


@needs_reference
def test_single_dicom_file_asks_for_the_series() -> None:
    with pytest.raises(UnreadableImageError, match="folder"):
        load_volume(next(EXAMPLE_DICOM.iterdir()), LIMITS)


def test_2d_image(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(InvalidImageError, match="TotalSegmentator works on 3D images"):
        load_volume(tmp_path / "flat.nii.gz", LIMITS)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (4, 5, 6, 1, 2)])
def test_genuinely_4d_or_5d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    nib.save(_image(shape), tmp_path / "multi.nii.gz")
    with pytest.raises(InvalidImageError, match="extract one 3D volume"):
        load_volume(tmp_path / "multi.nii.gz", LIMITS)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_stored_spacing(bad: float) -> None:
    def edit(header: nib.Nifti1Header) -> None:
        header["pixdim"][2] = bad

    raw = _header_edit(_image().to_bytes(), edit)
    with pytest.raises(InvalidImageError, match="spacing"):
        load_volume(raw, LIMITS)


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_degenerate_sform(bad: float) -> None:
    def edit(header: nib.Nifti1Header) -> None:
        header["sform_code"] = 1
        header["srow_x"][0] = header["srow_y"][0] = header["srow_z"][0] = bad

    raw = _header_edit(_image().to_bytes(), edit)
    with pytest.raises(InvalidImageError, match="affine"):
        load_volume(raw, LIMITS)


@pytest.mark.parametrize(
    "dtype",
    [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])],
    ids=["complex", "rgb"],
)
def test_non_scalar_voxels(dtype: Any) -> None:
    img = nib.Nifti1Image(np.zeros((4, 5, 6), dtype=dtype), np.eye(4))
    with pytest.raises(InvalidImageError, match="one integer or float value per voxel"):
        load_volume(img.to_bytes(), LIMITS)
    with pytest.raises(InvalidImageError, match="one integer or float value per voxel"):
        load_volume(img, LIMITS)


def test_huge_header_refused_before_reading(tmp_path: Path) -> None:
    # NIfTI-1 dims are int16, so 100000³ needs NIfTI-2; both files are only a header.
    two = nib.Nifti2Header()
    two.set_data_shape((100_000, 100_000, 100_000))
    one = nib.Nifti1Header()
    one.set_data_shape((32_000, 32_000, 32_000))
    for name, header in [("two.nii", two), ("one.nii", one)]:
        raw = header.binaryblock + b"\x00" * 4 + b"\x00" * 64
        with pytest.raises(ImageTooLargeError, match="more than the limit"):
            load_volume(_write(tmp_path / name, raw), LIMITS)
        with pytest.raises(ImageTooLargeError):
            load_volume(_write(tmp_path / f"{name}.gz", gzip.compress(raw)), LIMITS)


def test_voxel_limit_on_a_normal_image() -> None:
    with pytest.raises(ImageTooLargeError, match="RAYTSEG_MAX_VOXELS"):
        load_volume(_image((10, 10, 10)).to_bytes(), LoadLimits(max_voxels=999, max_archive_bytes=2**20))
    assert load_volume(_image((10, 10, 10)).to_bytes(), LoadLimits(1000, 2**20)).shape == (10, 10, 10)


# --- DICOM ---------------------------------------------------------------------------


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


@needs_reference
def test_two_series_are_ambiguous(tmp_path: Path) -> None:
    import pydicom

    folder = tmp_path / "mixed"
    shutil.copytree(EXAMPLE_DICOM, folder)
    for i, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.1" if i < 12 else "1.2.826.0.1.2"
        ds.SeriesDescription = "first" if i < 12 else "second"
        ds.save_as(path)
    with pytest.raises(AmbiguousDicomError) as info:
        load_volume(folder, LIMITS)
    message = str(info.value)
    assert "1.2.826.0.1.1: first, 12 slices" in message
    assert "1.2.826.0.1.2: second, 8 slices" in message
    assert "Pass one series" in message


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

    monkeypatch.setattr(load_module, "_convert_dicom", fail)
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


def test_byte_budget_stops_the_read() -> None:
    budget = load_module._ByteBudget(100, "upload.zip")
    budget.take(60)
    budget.take(40)
    with pytest.raises(UnsafeArchiveError, match="upload.zip expands past the limit"):
        budget.take(1)


def test_remote_folder_size_limit(memfs: tuple[Any, str]) -> None:
    fs, root = memfs
    fs.pipe_file(f"{root}/dcm/a.dcm", b"\x00" * 3000)
    with pytest.raises(ImageTooLargeError, match="RAYTSEG_MAX_ARCHIVE_BYTES"):
        load_volume(f"memory://{root}/dcm", LoadLimits(max_voxels=10**6, max_archive_bytes=1000))
