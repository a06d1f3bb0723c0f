"""Load stage: where the bytes come from (paths, URIs, bytes, images) and what they are."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.config import Settings
from raytseg.errors import ImageTooLargeError, StorageError, UnreadableImageError
from raytseg.pipeline.load import LoadLimits, load_volume

MakeImage = Callable[..., nib.Nifti1Image]
LIMITS = LoadLimits(max_voxels=50_000_000, max_archive_bytes=64 * 2**20)


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def test_limits_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        totalseg_home=tmp_path,
        weights_dir=tmp_path,
        cache_dir=tmp_path,
        max_voxels=123,
        max_archive_bytes=456,
    )
    assert LoadLimits.from_settings(settings) == LoadLimits(max_voxels=123, max_archive_bytes=456)


def test_bytes_input_plain_and_gzipped(make_image: MakeImage) -> None:
    img = make_image()
    raw = img.to_bytes()
    for blob in (raw, gzip.compress(raw)):
        vol = load_volume(blob, LIMITS)
        assert np.array_equal(vol.data, img.get_fdata())
        assert np.array_equal(vol.affine, img.affine)
        assert vol.source == "<bytes>"


def test_in_memory_image(make_image: MakeImage) -> None:
    img = make_image(dtype=np.float32)
    vol = load_volume(img, LIMITS)
    assert vol.data.dtype == np.float32
    assert np.array_equal(vol.data, img.dataobj)
    assert vol.header.binaryblock == img.header.binaryblock
    assert vol.source == "<memory>"


def test_memory_uri(memfs: tuple[Any, str], make_image: MakeImage) -> None:
    fs, root = memfs
    img = make_image()
    fs.pipe_file(f"{root}/ct.nii.gz", gzip.compress(img.to_bytes()))
    vol = load_volume(f"memory://{root}/ct.nii.gz", LIMITS)
    assert np.array_equal(vol.data, img.dataobj)
    assert vol.source == f"memory://{root}/ct.nii.gz"


def test_missing_uri_is_a_storage_error(memfs: tuple[Any, str]) -> None:
    _fs, root = memfs
    with pytest.raises(StorageError, match="does not exist"):
        load_volume(f"memory://{root}/absent.nii.gz", LIMITS)


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
def test_unreadable_inputs(
    tmp_path: Path, make: Callable[[bytes], bytes], phrase: str, make_image: MakeImage
) -> None:
    raw = make(make_image((10, 10, 10)).to_bytes())
    with pytest.raises(UnreadableImageError, match=phrase):
        load_volume(_write(tmp_path / "bad.nii.gz", raw), LIMITS)
    with pytest.raises(UnreadableImageError, match=phrase):
        load_volume(raw, LIMITS)


def test_remote_folder_size_limit(memfs: tuple[Any, str]) -> None:
    fs, root = memfs
    fs.pipe_file(f"{root}/dcm/a.dcm", b"\x00" * 3000)
    with pytest.raises(ImageTooLargeError, match="RAYTSEG_MAX_ARCHIVE_BYTES"):
        load_volume(f"memory://{root}/dcm", LoadLimits(max_voxels=10**6, max_archive_bytes=1000))
