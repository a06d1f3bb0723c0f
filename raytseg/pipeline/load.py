"""Load stage: a path, URI, byte string or nibabel image becomes a ``Volume``.

Accepted inputs, as TotalSegmentator accepts them:

- NIfTI (``.nii`` or ``.nii.gz``), read with nibabel exactly as ``nib.load`` reads it;
- a DICOM series, as a folder of slices, a zip of them or a DICOMweb series URI
  (``raytseg.dicomweb``), converted the way
  TotalSegmentator converts it (``dicom2nifti.dicom_series_to_nifti(..., reorient_nifti=True)``
  followed by ``nib.load``), but in memory: nothing is extracted or written to disk.

This module finds where the bytes are and what they are; ``raytseg.pipeline.nifti`` and
``raytseg.pipeline.dicom`` read them, and ``raytseg.archive`` checks zips.

Locations may be local paths or fsspec URIs (``s3://bucket/ct.nii.gz``, or a prefix that
holds DICOM files); raw bytes are sniffed (gzip or NIfTI magic, zip magic). Every check that
can be made from a header runs before voxels are read, so an oversized or malformed input
costs little. Bad input raises an ``InputError`` subclass whose message says what to do.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib

from raytseg import dicomweb, storage
from raytseg.archive import ArchiveLimits, ByteBudget
from raytseg.errors import ImageTooLargeError, RaytsegError, UnreadableImageError
from raytseg.pipeline.dicom import (
    ARCHIVE_ADVICE,
    datasets_from_blobs,
    dicom_volume,
    imaging_only,
    read_dicom_dir,
    read_zip,
)
from raytseg.pipeline.nifti import FIX_NIFTI, read_nifti, volume_from_image
from raytseg.pipeline.records import Volume

if TYPE_CHECKING:
    from raytseg.config import Settings

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_HEAD_BYTES = 540  # a NIfTI-2 header; NIfTI-1 needs 348


@dataclass(frozen=True)
class LoadLimits:
    """Size limits the load stage enforces before it allocates anything large.

    Args:
        max_voxels: refuse images with more voxels than this (from the header).
        max_archive_bytes: refuse zips (and remote DICOM folders) larger than this.
    """

    max_voxels: int
    max_archive_bytes: int

    @property
    def archive(self) -> ArchiveLimits:
        """A zip of DICOM slices: no member larger than the largest allowed image needs
        (2 bytes a voxel, as CT and MR store them, plus headers), none compressed past
        200:1, so a bomb is refused before a byte of it is read."""
        return ArchiveLimits(
            self.max_archive_bytes, member_bytes=2 * self.max_voxels + (16 << 20), ratio=200.0
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> LoadLimits:
        """The limits configured in ``Settings``."""
        return cls(max_voxels=settings.max_voxels, max_archive_bytes=settings.max_archive_bytes)


def load_volume(source: str | os.PathLike[str] | bytes | nib.Nifti1Image, limits: LoadLimits) -> Volume:
    """Read an image into a ``Volume`` exactly as TotalSegmentator reads it.

    Args:
        source: a local path or fsspec URI of a ``.nii``/``.nii.gz`` file, a DICOM zip or
            a folder (prefix) of DICOM slices; a DICOMweb series URI; the bytes of a NIfTI
            file or DICOM zip; or an in-memory ``nib.Nifti1Image``.
        limits: size limits, checked from headers before voxels are read.

    Returns:
        The voxels (NIfTI scaling applied), affine and header of the image; for DICOM
        also the Modality tag.

    Raises:
        UnreadableImageError: missing, empty, truncated or not NIfTI/DICOM.
        InvalidImageError: 2D, genuinely 4D, bad spacing or affine, non-scalar voxels.
        ImageTooLargeError: more voxels than ``limits.max_voxels``.
        UnsafeArchiveError: a zip with unsafe paths, links or too many bytes.
        AmbiguousDicomError: more than one DICOM series.
        StorageError: a URI could not be read.

    Example:
        >>> limits = LoadLimits(max_voxels=512 * 512 * 2048, max_archive_bytes=8 * 1024**3)
        >>> vol = load_volume("ct.nii.gz", limits)  # doctest: +SKIP
        >>> vol.shape, vol.zooms  # doctest: +SKIP
        ((512, 512, 300), (0.8, 0.8, 1.5))
    """
    if isinstance(source, nib.Nifti1Image):
        return volume_from_image(source, "<memory>", limits.max_voxels)
    if isinstance(source, bytes):
        return _load_stream(io.BytesIO(source), limits, "<bytes>")
    location = os.fspath(source)
    if dicomweb.is_dicomweb(location):
        datasets = dicomweb.read_series(location, limits.max_voxels, limits.max_archive_bytes)
        return dicom_volume(imaging_only(datasets), location, limits.max_voxels)
    if storage.is_uri(location):
        return _load_uri(location, limits)
    return _load_local(storage.local_path(location), limits)


# --- where the bytes come from -------------------------------------------------------


def _load_local(path: Path, limits: LoadLimits) -> Volume:
    if path.is_dir():
        return dicom_volume(read_dicom_dir(path), str(path), limits.max_voxels)
    try:
        stream = path.open("rb")
    except FileNotFoundError as exc:
        raise UnreadableImageError(f"{path} does not exist. Check the path.") from exc
    except OSError as exc:
        raise UnreadableImageError(f"Could not open {path}: {exc}. Check that the file is readable.") from exc
    with stream:
        return _load_stream(stream, limits, str(path))


def _load_uri(uri: str, limits: LoadLimits) -> Volume:
    fs, path = storage.filesystem(uri)
    try:
        is_folder = bool(fs.isdir(path))
    except RaytsegError:  # already says what to do (a refused redirect)
        raise
    except Exception as exc:
        raise storage.storage_error(uri, "read", exc) from exc
    if is_folder:
        blobs = _read_remote_folder(fs, path, uri, limits)
        return dicom_volume(datasets_from_blobs(blobs), uri, limits.max_voxels)
    return _load_stream(io.BytesIO(storage.read_bytes(uri)), limits, uri)


def _read_remote_folder(fs: Any, path: str, uri: str, limits: LoadLimits) -> list[tuple[str, bytes]]:
    """Every object under a prefix, refused past ``max_archive_bytes`` like a zip."""
    try:
        listing = fs.find(path, detail=True)
        sizes = {
            str(p): int(info.get("size") or 0)
            for p, info in listing.items()
            if info.get("type") != "directory"
        }
    except Exception as exc:
        raise storage.storage_error(uri, "list", exc) from exc
    total = sum(sizes.values())
    if total > limits.max_archive_bytes:
        raise ImageTooLargeError(
            f"{uri} holds {total} bytes, more than the limit of {limits.max_archive_bytes}. "
            "Pass a prefix that holds one DICOM series only, or raise RAYTSEG_MAX_ARCHIVE_BYTES."
        )
    budget = ByteBudget(limits.max_archive_bytes, uri, ARCHIVE_ADVICE)
    blobs = []
    for name in sorted(sizes):
        try:
            blob = bytes(fs.cat_file(name))
        except Exception as exc:
            raise storage.storage_error(f"{name} under {uri}", "read", exc) from exc
        budget.take(len(blob))  # the listing's sizes may be stale
        blobs.append((name, blob))
    return blobs


def _load_stream(stream: io.BufferedIOBase, limits: LoadLimits, name: str) -> Volume:
    """A NIfTI file (plain or gzipped) or a DICOM zip, told apart by their magic bytes."""
    head = _peek(stream, name)
    if not head:
        raise UnreadableImageError(f"{name} is empty. Pass a NIfTI file or a zip of DICOM slices.")
    if head.startswith(_GZIP_MAGIC):
        inner = gzip.GzipFile(fileobj=stream, mode="rb")
        return _read_nifti(inner, _peek(inner, name), limits, name)
    if head[:4] in _ZIP_MAGICS:
        blobs = read_zip(stream, limits.archive, name)
        return dicom_volume(datasets_from_blobs(blobs), name, limits.max_voxels)
    return _read_nifti(stream, head, limits, name)


def _peek(stream: io.BufferedIOBase, name: str) -> bytes:
    """The first bytes of a stream, which is then rewound."""
    try:
        head = stream.read(_HEAD_BYTES)
        stream.seek(0)
    except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile is an OSError
        raise UnreadableImageError(f"{name} is not a valid gzip file ({exc}). {FIX_NIFTI}") from exc
    return head


def _read_nifti(stream: io.BufferedIOBase, head: bytes, limits: LoadLimits, name: str) -> Volume:
    # A data offset past the archive limit cannot be genuine; it would only make nibabel seek.
    return read_nifti(stream, head, name, max_voxels=limits.max_voxels, max_offset=limits.max_archive_bytes)
