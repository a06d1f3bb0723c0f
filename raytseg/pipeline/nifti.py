"""NIfTI reading for the load stage, and the checks every image passes on its way to a ``Volume``.

A NIfTI file is read exactly as ``nib.load`` reads it, but its header is checked first
(NIfTI-1 or NIfTI-2, shape, dtype, spacing, data offset), so an oversized or malformed
file costs a header read. ``volume_from_image`` is the one door into a ``Volume``: NIfTI
files, in-memory images and converted DICOM series all go through it.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from typing import Any

import nibabel as nib
import numpy as np

from raytseg.errors import ImageTooLargeError, InputError, InvalidImageError, UnreadableImageError
from raytseg.pipeline.records import Volume

logger = logging.getLogger(__name__)

FIX_NIFTI = "Re-export the image as a 3D NIfTI (.nii.gz) or pass the DICOM series as a folder or zip."


def read_nifti(
    stream: io.BufferedIOBase, head: bytes, name: str, *, max_voxels: int, max_offset: int
) -> Volume:
    """A NIfTI-1 or NIfTI-2 file whose first bytes are ``head``, checked before its voxels are read."""
    image_class = _nifti_class(head, name)
    try:
        raw = image_class.header_class.from_fileobj(io.BytesIO(head), check=False)
        shape = tuple(int(d) for d in raw.get_data_shape())
        dtype = raw.get_data_dtype()
        vox_offset = float(raw["vox_offset"])
    except Exception as exc:
        raise UnreadableImageError(f"{name} has a corrupt NIfTI header ({exc}). {FIX_NIFTI}") from exc
    _check_shape(shape, max_voxels, name)
    _check_dtype(dtype, name)
    # nibabel silently turns zero spacing into 1 and negative into its absolute value on
    # load, so the stored values are checked here, before it does.
    _check_zooms(tuple(float(z) for z in raw["pixdim"][1:4]), name)
    if not math.isfinite(vox_offset) or vox_offset > max_offset:
        raise UnreadableImageError(f"{name} has an invalid data offset ({vox_offset}). {FIX_NIFTI}")
    try:
        holder = nib.FileHolder(fileobj=stream)
        img = image_class.from_file_map({"header": holder, "image": holder})
    except Exception as exc:
        raise UnreadableImageError(f"{name} has a corrupt NIfTI header ({exc}). {FIX_NIFTI}") from exc
    return volume_from_image(img, name, max_voxels)


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
        raise UnreadableImageError(f"{name} is truncated inside its NIfTI header. {FIX_NIFTI}")
    raise UnreadableImageError(
        f"{name} is neither a NIfTI file (.nii, .nii.gz) nor a zip of DICOM slices. {FIX_NIFTI}"
    )


def volume_from_image(
    img: nib.Nifti1Image, name: str, max_voxels: int, modality: str | None = None
) -> Volume:
    """Validate an image, then read its voxels (the only step that touches them)."""
    shape = tuple(int(d) for d in img.shape)
    _check_shape(shape, max_voxels, name)
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
            f"Could not read the voxels of {name} ({exc}); the file is probably truncated. {FIX_NIFTI}"
        ) from exc
    return Volume(data=data, affine=affine, header=header, modality=modality, source=name)


def _nifti1_header(header: Any) -> nib.Nifti1Header:
    try:
        copied: nib.Nifti1Header = (
            header.copy() if type(header) is nib.Nifti1Header else nib.Nifti1Header.from_header(header)
        )
    except Exception as exc:
        raise InvalidImageError(
            f"The header of the image cannot be stored as NIfTI-1 ({exc}). {FIX_NIFTI}"
        ) from exc
    return copied


def _check_shape(shape: tuple[int, ...], max_voxels: int, name: str) -> None:
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
        raise InvalidImageError(f"{name} has shape {shape}, with no voxels. {FIX_NIFTI}")
    voxels = math.prod(shape[:3])
    if voxels > max_voxels:
        raise ImageTooLargeError(
            f"{name} has {voxels} voxels (shape {shape[:3]}), more than the limit of {max_voxels}. "
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
