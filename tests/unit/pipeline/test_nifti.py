"""NIfTI reading: equality with ``nib.load``, and every refusal of a malformed image."""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import ImageTooLargeError, InvalidImageError, UnreadableImageError
from raytseg.pipeline.load import LoadLimits, load_volume

MakeImage = Callable[..., nib.Nifti1Image]
REPO = Path(__file__).resolve().parents[3]
REFERENCE = REPO.parent / "shared" / "data" / "totalseg-reference"
EXAMPLE_CT = REFERENCE / "example_ct_sm.nii.gz"
EXAMPLE_DICOM = REFERENCE / "example_ct_dicom"
needs_reference = pytest.mark.skipif(
    not (EXAMPLE_CT.is_file() and EXAMPLE_DICOM.is_dir()), reason="TotalSegmentator example data not present"
)

LIMITS = LoadLimits(max_voxels=50_000_000, max_archive_bytes=64 * 2**20)


def _header_edit(raw: bytes, edit: Callable[[nib.Nifti1Header], None]) -> bytes:
    """Change fields of a stored NIfTI-1 header in place, unchecked (nibabel would fix them)."""
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    edit(header)
    return header.binaryblock + raw[348:]


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


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
def test_scaled_and_unscaled_nifti_like_nib_load(tmp_path: Path, suffix: str, make_image: MakeImage) -> None:
    scaled = make_image()
    scaled.header.set_slope_inter(2.0, -1.0)
    for name, img in [("plain", make_image()), ("scaled", scaled)]:
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


def test_nifti2_is_read_into_a_nifti1_header(tmp_path: Path, make_image: MakeImage) -> None:
    img = make_image()
    path = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(img.dataobj, img.affine), path)
    vol = load_volume(path, LIMITS)
    assert isinstance(vol.header, nib.Nifti1Header)
    assert np.array_equal(vol.data, img.dataobj)
    assert vol.zooms == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("shape", [(4, 5, 6, 1), (4, 5, 6, 1, 1)])
def test_trailing_singleton_dims_are_squeezed(
    tmp_path: Path, shape: tuple[int, ...], make_image: MakeImage
) -> None:
    img = make_image(shape)
    path = tmp_path / "ct4d.nii.gz"
    nib.save(img, path)
    vol = load_volume(path, LIMITS)
    assert vol.shape == (4, 5, 6)
    assert vol.data.ndim == 3
    assert np.array_equal(vol.data, np.asanyarray(img.dataobj).reshape(4, 5, 6))
    # as TotalSegmentator: a fresh header built from voxels and affine
    assert vol.header.get_data_shape() == (4, 5, 6)
    assert vol.zooms == (1.0, 2.0, 3.0)


@needs_reference
def test_single_dicom_file_asks_for_the_series() -> None:
    with pytest.raises(UnreadableImageError, match="folder"):
        load_volume(next(EXAMPLE_DICOM.iterdir()), LIMITS)


def test_2d_image(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(InvalidImageError, match="TotalSegmentator works on 3D images"):
        load_volume(tmp_path / "flat.nii.gz", LIMITS)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (4, 5, 6, 1, 2)])
def test_genuinely_4d_or_5d(tmp_path: Path, shape: tuple[int, ...], make_image: MakeImage) -> None:
    nib.save(make_image(shape), tmp_path / "multi.nii.gz")
    with pytest.raises(InvalidImageError, match="extract one 3D volume"):
        load_volume(tmp_path / "multi.nii.gz", LIMITS)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_stored_spacing(bad: float, make_image: MakeImage) -> None:
    def edit(header: nib.Nifti1Header) -> None:
        header["pixdim"][2] = bad

    raw = _header_edit(make_image().to_bytes(), edit)
    with pytest.raises(InvalidImageError, match="spacing"):
        load_volume(raw, LIMITS)


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_degenerate_sform(bad: float, make_image: MakeImage) -> None:
    def edit(header: nib.Nifti1Header) -> None:
        header["sform_code"] = 1
        header["srow_x"][0] = header["srow_y"][0] = header["srow_z"][0] = bad

    raw = _header_edit(make_image().to_bytes(), edit)
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


def test_voxel_limit_on_a_normal_image(make_image: MakeImage) -> None:
    with pytest.raises(ImageTooLargeError, match="RAYTSEG_MAX_VOXELS"):
        load_volume(make_image((10, 10, 10)).to_bytes(), LoadLimits(max_voxels=999, max_archive_bytes=2**20))
    assert load_volume(make_image((10, 10, 10)).to_bytes(), LoadLimits(1000, 2**20)).shape == (10, 10, 10)


# --- DICOM ---------------------------------------------------------------------------
