"""Load stage: a path, URI, byte string or nibabel image becomes a ``Volume``.

Accepted inputs, as TotalSegmentator accepts them:

- NIfTI (``.nii`` or ``.nii.gz``), read with nibabel exactly as ``nib.load`` reads it;
- a DICOM series, as a folder of slices or a zip of them, converted the way
  TotalSegmentator converts it (``dicom2nifti.dicom_series_to_nifti(..., reorient_nifti=True)``
  followed by ``nib.load``), but in memory: nothing is extracted or written to disk.

Locations may be local paths or fsspec URIs (``s3://bucket/ct.nii.gz``, or a prefix that
holds DICOM files); raw bytes are sniffed (gzip or NIfTI magic, zip magic). Every check that
can be made from a header runs before voxels are read, so an oversized or malformed input
costs little. Bad input raises an ``InputError`` subclass whose message says what to do.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import stat
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from raytseg import storage
from raytseg.errors import (
    AmbiguousDicomError,
    ImageTooLargeError,
    InputError,
    InvalidImageError,
    StorageError,
    UnreadableImageError,
    UnsafeArchiveError,
)
from raytseg.pipeline.records import Volume

if TYPE_CHECKING:
    from raytseg.config import Settings

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_HEAD_BYTES = 540  # a NIfTI-2 header; NIfTI-1 needs 348
_CHUNK_BYTES = 1 << 20
# dicom2nifti's read options (common.read_dicom_directory): pixel data is read on demand.
_DICOM_DEFER_SIZE = "1 KB"
_FIX_NIFTI = "Re-export the image as a 3D NIfTI (.nii.gz) or pass the DICOM series as a folder or zip."


@dataclass(frozen=True)
class LoadLimits:
    """Size limits the load stage enforces before it allocates anything large.

    Args:
        max_voxels: refuse images with more voxels than this (from the header).
        max_archive_bytes: refuse zips (and remote DICOM folders) larger than this.
    """

    max_voxels: int
    max_archive_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> LoadLimits:
        """The limits configured in ``Settings``."""
        return cls(max_voxels=settings.max_voxels, max_archive_bytes=settings.max_archive_bytes)


def load_volume(source: str | os.PathLike[str] | bytes | nib.Nifti1Image, limits: LoadLimits) -> Volume:
    """Read an image into a ``Volume`` exactly as TotalSegmentator reads it.

    Args:
        source: a local path or fsspec URI of a ``.nii``/``.nii.gz`` file, a DICOM zip or
            a folder (prefix) of DICOM slices; the bytes of a NIfTI file or DICOM zip; or
            an in-memory ``nib.Nifti1Image``.
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
        return _from_image(source, limits, "<memory>")
    if isinstance(source, bytes):
        return _load_stream(io.BytesIO(source), limits, "<bytes>")
    location = os.fspath(source)
    if storage.is_uri(location):
        return _load_uri(location, limits)
    return _load_local(storage.local_path(location), limits)


# --- where the bytes come from -------------------------------------------------------


def _load_local(path: Path, limits: LoadLimits) -> Volume:
    if path.is_dir():
        return _dicom_volume(_read_dicom_dir(path), limits, str(path))
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
    except Exception as exc:
        raise StorageError(f"Could not read {uri}: {exc}. Check the URI and your credentials.") from exc
    if is_folder:
        return _dicom_volume(_datasets_from_blobs(_read_remote_folder(fs, path, uri, limits)), limits, uri)
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
        raise StorageError(f"Could not list {uri}: {exc}. Check the URI and your credentials.") from exc
    total = sum(sizes.values())
    if total > limits.max_archive_bytes:
        raise ImageTooLargeError(
            f"{uri} holds {total} bytes, more than the limit of {limits.max_archive_bytes}. "
            "Pass a prefix that holds one DICOM series only, or raise RAYTSEG_MAX_ARCHIVE_BYTES."
        )
    budget = _ByteBudget(limits.max_archive_bytes, uri)
    blobs = []
    for name in sorted(sizes):
        try:
            blob = bytes(fs.cat_file(name))
        except Exception as exc:
            raise StorageError(f"Could not read {name} under {uri}: {exc}") from exc
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
        return _dicom_volume(_datasets_from_blobs(_read_zip(stream, limits, name)), limits, name)
    return _read_nifti(stream, head, limits, name)


def _peek(stream: io.BufferedIOBase, name: str) -> bytes:
    """The first bytes of a stream, which is then rewound."""
    try:
        head = stream.read(_HEAD_BYTES)
        stream.seek(0)
    except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile is an OSError
        raise UnreadableImageError(f"{name} is not a valid gzip file ({exc}). {_FIX_NIFTI}") from exc
    return head


# --- NIfTI ---------------------------------------------------------------------------


def _read_nifti(stream: io.BufferedIOBase, head: bytes, limits: LoadLimits, name: str) -> Volume:
    image_class = _nifti_class(head, name)
    try:
        raw = image_class.header_class.from_fileobj(io.BytesIO(head), check=False)
        shape = tuple(int(d) for d in raw.get_data_shape())
        dtype = raw.get_data_dtype()
        vox_offset = float(raw["vox_offset"])
    except Exception as exc:
        raise UnreadableImageError(f"{name} has a corrupt NIfTI header ({exc}). {_FIX_NIFTI}") from exc
    _check_shape(shape, limits, name)
    _check_dtype(dtype, name)
    # nibabel silently turns zero spacing into 1 and negative into its absolute value on
    # load, so the stored values are checked here, before it does.
    _check_zooms(tuple(float(z) for z in raw["pixdim"][1:4]), name)
    if not math.isfinite(vox_offset) or vox_offset > limits.max_archive_bytes:
        raise UnreadableImageError(f"{name} has an invalid data offset ({vox_offset}). {_FIX_NIFTI}")
    try:
        holder = nib.FileHolder(fileobj=stream)
        img = image_class.from_file_map({"header": holder, "image": holder})
    except Exception as exc:
        raise UnreadableImageError(f"{name} has a corrupt NIfTI header ({exc}). {_FIX_NIFTI}") from exc
    return _from_image(img, limits, name)


def _nifti_class(head: bytes, name: str) -> type[nib.Nifti1Image]:
    """NIfTI-1 or NIfTI-2 from the header size and magic; anything else is refused."""
    sizes = {struct.unpack(f"{order}i", head[:4])[0] for order in "<>"} if len(head) >= 4 else set()
    if 348 in sizes and head[344:348] == b"n+1\x00":
        return nib.Nifti1Image
    if 540 in sizes and head[4:8] == b"n+2\x00":
        return nib.Nifti2Image
    if 348 in sizes and head[344:348] == b"ni1\x00":
        raise UnreadableImageError(
            f"{name} is the header of a NIfTI pair (.hdr/.img). Convert it to a single .nii.gz file."
        )
    if head[128:132] == b"DICM":
        raise UnreadableImageError(
            f"{name} is a single DICOM file. Pass the folder (or a zip) that holds every slice of the series."
        )
    if sizes & {348, 540} and len(head) < 348:
        raise UnreadableImageError(f"{name} is truncated inside its NIfTI header. {_FIX_NIFTI}")
    raise UnreadableImageError(
        f"{name} is neither a NIfTI file (.nii, .nii.gz) nor a zip of DICOM slices. {_FIX_NIFTI}"
    )


# --- checks and the Volume -----------------------------------------------------------


def _from_image(img: nib.Nifti1Image, limits: LoadLimits, name: str, modality: str | None = None) -> Volume:
    """Validate an image, then read its voxels (the only step that touches them)."""
    shape = tuple(int(d) for d in img.shape)
    _check_shape(shape, limits, name)
    _check_dtype(img.get_data_dtype(), name)
    if isinstance(img.dataobj, np.ndarray):
        _check_dtype(img.dataobj.dtype, name)
    _check_zooms(tuple(float(z) for z in img.header.get_zooms()[:3]), name)
    affine = _checked_affine(img.affine, name)
    try:
        if len(shape) == 3:
            data = np.asanyarray(img.dataobj)
            header = _nifti1_header(img.header)
        else:
            data = np.asanyarray(img.dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)])
            # TotalSegmentator rebuilds such images from voxels and affine alone, so the
            # output header is a fresh one too (nnunet.py: nib.Nifti1Image(data[..., 0], affine)).
            header = nib.Nifti1Image(data, affine).header
            logger.warning("%s has shape %s; using the first 3D volume.", name, shape)
    except InputError:
        raise
    except Exception as exc:
        raise UnreadableImageError(
            f"Could not read the voxels of {name} ({exc}); the file is probably truncated. {_FIX_NIFTI}"
        ) from exc
    return Volume(data=data, affine=affine, header=header, modality=modality, source=name)


def _nifti1_header(header: Any) -> nib.Nifti1Header:
    try:
        copied: nib.Nifti1Header = (
            header.copy() if type(header) is nib.Nifti1Header else nib.Nifti1Header.from_header(header)
        )
    except Exception as exc:
        raise InvalidImageError(
            f"The header of the image cannot be stored as NIfTI-1 ({exc}). {_FIX_NIFTI}"
        ) from exc
    return copied


def _check_shape(shape: tuple[int, ...], limits: LoadLimits, name: str) -> None:
    ndim = len(shape)
    if ndim < 3:
        raise InvalidImageError(
            f"{name} is a {ndim}D image with shape {shape}. TotalSegmentator works on 3D images; "
            "pass a 3D volume (a NIfTI file or a whole DICOM series)."
        )
    if any(d != 1 for d in shape[3:]):
        raise InvalidImageError(
            f"{name} is a {ndim}D image with shape {shape}. TotalSegmentator works on 3D images; "
            "extract one 3D volume first, e.g. nib.Nifti1Image(img.dataobj[..., 0], img.affine) "
            "or `fslroi in.nii.gz out.nii.gz 0 1`."
        )
    if min(shape[:3]) < 1:
        raise InvalidImageError(f"{name} has shape {shape}, with no voxels. {_FIX_NIFTI}")
    voxels = math.prod(shape[:3])
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(
            f"{name} has {voxels} voxels (shape {shape[:3]}), more than the limit of {limits.max_voxels}. "
            "Crop or resample the image, or raise RAYTSEG_MAX_VOXELS."
        )


def _check_dtype(dtype: np.dtype[Any], name: str) -> None:
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise InvalidImageError(
            f"{name} stores voxels as {dtype}; TotalSegmentator needs one integer or float value per voxel. "
            "Convert RGB, complex or structured images to a single-channel 3D image first."
        )


def _check_zooms(zooms: tuple[float, ...], name: str) -> None:
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise InvalidImageError(
            f"{name} has voxel spacing {zooms}; every spacing must be a positive, finite number of mm. "
            "Fix the header (pixdim) of the image."
        )


def _checked_affine(affine: Any, name: str) -> np.ndarray:
    matrix = None if affine is None else np.array(affine, dtype=np.float64)
    if matrix is None or matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise InvalidImageError(
            f"{name} has no finite 4x4 affine. Fix the header (sform/qform) of the image."
        )
    if np.any(np.linalg.norm(matrix[:3, :3], axis=0) == 0):
        raise InvalidImageError(
            f"{name} has an affine with a zero axis (zero voxel spacing). Fix the header (sform/qform)."
        )
    return matrix


# --- zip archives --------------------------------------------------------------------


class _ByteBudget:
    """Counts bytes as they are read and stops the read when the limit is passed."""

    def __init__(self, limit: int, name: str) -> None:
        self.left = limit
        self.name = name

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise UnsafeArchiveError(
                f"{self.name} expands past the limit of the archive size. "
                "Pass one DICOM series per zip, or raise RAYTSEG_MAX_ARCHIVE_BYTES."
            )


def _read_zip(stream: io.BufferedIOBase, limits: LoadLimits, name: str) -> list[tuple[str, bytes]]:
    """Every member's bytes, in memory; nothing is extracted."""
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnreadableImageError(f"{name} is not a readable zip file ({exc}). Re-create the zip.") from exc
    with archive:
        infos = archive.infolist()
        _check_zip_members(infos, limits, name)
        budget = _ByteBudget(limits.max_archive_bytes, name)
        return [
            (info.filename, _read_member(archive, info, budget, name)) for info in infos if not info.is_dir()
        ]


def _check_zip_members(infos: list[zipfile.ZipInfo], limits: LoadLimits, name: str) -> None:
    for info in infos:
        reason = _unsafe_member(info)
        if reason:
            raise UnsafeArchiveError(
                f"{name} holds {info.filename!r}, which {reason}. "
                "Zip the DICOM slices with relative paths only."
            )
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_archive_bytes:
        raise UnsafeArchiveError(
            f"{name} expands to {declared} bytes, more than the limit of {limits.max_archive_bytes}. "
            "Pass one DICOM series per zip, or raise RAYTSEG_MAX_ARCHIVE_BYTES."
        )


def _unsafe_member(info: zipfile.ZipInfo) -> str | None:
    path = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return "has an absolute path"
    if ".." in path.replace("\\", "/").split("/"):
        return "climbs out of the archive ('..')"
    return None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _ByteBudget, name: str) -> bytes:
    chunks = []
    try:
        with archive.open(info) as member:
            while chunk := member.read(_CHUNK_BYTES):
                budget.take(len(chunk))
                chunks.append(chunk)
    except InputError:
        raise
    except Exception as exc:
        raise UnreadableImageError(
            f"Could not read {info.filename!r} from {name} ({exc}). Re-create the zip."
        ) from exc
    return b"".join(chunks)


# --- DICOM ---------------------------------------------------------------------------


def _read_dicom_dir(folder: Path) -> list[Any]:
    """A folder's DICOM image files, as dicom2nifti's ``common.read_dicom_directory`` reads them."""
    datasets = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for file_name in sorted(files):
            path = Path(root) / file_name
            try:
                with path.open("rb") as f:
                    head = f.read(132)
            except OSError as exc:
                raise UnreadableImageError(
                    f"Could not read {path}: {exc}. Check the folder's permissions."
                ) from exc
            if _is_dicom(head, str(path)):
                datasets.append(_dcmread(str(path), str(path)))
    return [ds for ds in datasets if _is_imaging(ds)]


def _datasets_from_blobs(blobs: Iterable[tuple[str, bytes]]) -> list[Any]:
    datasets = [_dcmread(io.BytesIO(blob), name) for name, blob in blobs if _is_dicom(blob, io.BytesIO(blob))]
    return [ds for ds in datasets if _is_imaging(ds)]


def _is_dicom(head: bytes, source: str | io.BufferedIOBase) -> bool:
    """dicom2nifti's ``common.is_dicom_file``: the DICM marker, or a forced read when so configured."""
    if head[128:132] == b"DICM":
        return True
    import dicom2nifti.settings
    import pydicom

    if not dicom2nifti.settings.pydicom_read_force:
        return False
    try:
        pydicom.dcmread(source, defer_size=_DICOM_DEFER_SIZE, stop_before_pixels=True, force=True)
    except Exception:
        return False
    return True


def _dcmread(source: str | io.BufferedIOBase, name: str) -> Any:
    import dicom2nifti.settings
    import pydicom

    try:
        return pydicom.dcmread(
            source, defer_size=_DICOM_DEFER_SIZE, force=dicom2nifti.settings.pydicom_read_force
        )
    except Exception as exc:
        raise UnreadableImageError(
            f"{name} looks like DICOM but cannot be read ({exc}). Remove or replace it."
        ) from exc


def _is_imaging(dataset: Any) -> bool:
    from dicom2nifti.common import is_valid_imaging_dicom

    return bool(is_valid_imaging_dicom(dataset))


def _dicom_volume(datasets: list[Any], limits: LoadLimits, origin: str) -> Volume:
    if not datasets:
        raise UnreadableImageError(
            f"No DICOM image files found in {origin}. Pass a NIfTI file, or a folder or zip that holds "
            "the DICOM slices of one series."
        )
    _check_one_series(datasets, origin)
    _check_dicom_size(datasets, limits, origin)
    modality = str(datasets[0].get("Modality") or "") or None
    img = _convert_dicom(datasets, origin)
    return _from_image(img, limits, f"{origin} (DICOM, {len(datasets)} files)", modality)


def _check_one_series(datasets: list[Any], origin: str) -> None:
    series: dict[str, list[Any]] = {}
    for ds in datasets:
        series.setdefault(str(ds.get("SeriesInstanceUID") or ""), []).append(ds)
    if len(series) < 2:
        return
    lines = [
        f"  - {uid or '<no SeriesInstanceUID>'}: "
        f"{str(items[0].get('SeriesDescription') or '') or '<no description>'}, {len(items)} slices"
        for uid, items in sorted(series.items())
    ]
    raise AmbiguousDicomError(
        f"{origin} holds {len(series)} DICOM series:\n"
        + "\n".join(lines)
        + "\nPass one series: put its slices in a folder or zip of their own."
    )


def _check_dicom_size(datasets: list[Any], limits: LoadLimits, origin: str) -> None:
    """Rows x columns x frames of every slice, from the headers, before any pixel is decoded."""
    try:
        voxels = sum(
            int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("NumberOfFrames") or 1)
            for ds in datasets
        )
    except (TypeError, ValueError) as exc:
        raise UnreadableImageError(f"{origin} has DICOM slices with invalid sizes ({exc}).") from exc
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(
            f"{origin} has {voxels} voxels, more than the limit of {limits.max_voxels}. "
            "Pass a smaller series, or raise RAYTSEG_MAX_VOXELS."
        )


def _convert_dicom(datasets: list[Any], origin: str) -> nib.Nifti1Image:
    """``dicom_series_to_nifti(..., reorient_nifti=True)`` then ``nib.load``, without files."""
    from dicom2nifti.convert_dicom import dicom_array_to_nifti
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    try:
        # With reorient_nifti=True dicom2nifti insists on writing the file; reorient here instead.
        converted = dicom_array_to_nifti(datasets, None, reorient_nifti=False)
        reoriented = _reorient_like_dicom2nifti(converted["NII"])
        # A save and load fixes the header fields and dtype as TotalSegmentator sees them.
        return nib.Nifti1Image.from_bytes(reoriented.to_bytes())
    except InputError:
        raise
    except (ConversionError, ConversionValidationError) as exc:
        raise InvalidImageError(
            f"The DICOM series in {origin} cannot be converted ({exc}): slices are missing, "
            "duplicated or inconsistent. Pass one complete series."
        ) from exc
    except Exception as exc:
        raise UnreadableImageError(f"The DICOM series in {origin} cannot be read ({exc}).") from exc


def _reorient_like_dicom2nifti(nii: Any) -> nib.Nifti1Image:
    """dicom2nifti 2.6's ``image_reorientation.reorient_image`` (LAS), minus its write to disk."""
    from dicom2nifti.image_reorientation import _reorient
    from dicom2nifti.image_volume import ImageVolume

    image = ImageVolume(nii)
    if image.nifti_data.squeeze().ndim not in (2, 3, 4) and image.nifti_data.ndim != 3:
        raise InvalidImageError("The DICOM series is not a 3D or 4D image. Pass one 3D series.")
    new_image = _reorient(image)
    if new_image.ndim > 3:  # dicom2nifti does not squeeze single-slice data
        new_image = new_image.squeeze()
    output = nib.Nifti1Image(new_image, _las_affine(image))
    output.header.set_slope_inter(1, 0)
    output.header.set_xyzt_units(2)
    return output


def _las_affine(image: Any) -> np.ndarray:
    """The affine ``reorient_image`` builds for its LAS data (same columns, flips, origin)."""
    affine = image.affine
    sagittal, coronal, axial = image.sagittal_orientation, image.coronal_orientation, image.axial_orientation
    new_affine = np.eye(4)
    new_affine[:, 0] = affine[:, sagittal.normal_component]
    new_affine[:, 1] = affine[:, coronal.normal_component]
    new_affine[:, 2] = affine[:, axial.normal_component]
    point = [0, 0, 0, 1]
    if not axial.x_inverted:
        new_affine[:, 0] = -new_affine[:, 0]
        point[sagittal.normal_component] = image.dimensions[sagittal.normal_component] - 1
    if axial.y_inverted:
        new_affine[:, 1] = -new_affine[:, 1]
        point[coronal.normal_component] = image.dimensions[coronal.normal_component] - 1
    if coronal.y_inverted:
        new_affine[:, 2] = -new_affine[:, 2]
        point[axial.normal_component] = image.dimensions[axial.normal_component] - 1
    new_affine[:, 3] = np.dot(affine, point)
    return new_affine
