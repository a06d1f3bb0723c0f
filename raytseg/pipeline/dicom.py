"""DICOM reading for the load stage: a series, from a folder, a zip or a list of blobs.

A series is converted the way TotalSegmentator converts it
(``dicom2nifti.dicom_series_to_nifti(..., reorient_nifti=True)`` followed by ``nib.load``),
but in memory: nothing is extracted or written to disk. Before any pixel is decoded, the
headers alone decide which slices make the volume (``raytseg.pipeline.dicom_series``: no
localizers, one series) and that it fits the voxel limit. Series TotalSegmentator cannot
convert (gantry tilt, jittered positions) are converted with dicom2nifti's own tools where
that is correct, and refused otherwise. Zips are checked by ``raytseg.archive`` before a
member is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from raytseg.archive import ArchiveLimits, ByteBudget, check_members, copy_member
from raytseg.errors import (
    ImageTooLargeError,
    InputError,
    InvalidImageError,
    UnreadableImageError,
)
from raytseg.pipeline.dicom_series import Stack, select_stack
from raytseg.pipeline.nifti import volume_from_image
from raytseg.pipeline.records import Volume

# dicom2nifti's read options (common.read_dicom_directory): pixel data is read on demand.
_DICOM_DEFER_SIZE = "1 KB"
# What to do when a zip (or a remote folder) of slices is refused.
ARCHIVE_ADVICE = (
    "Zip the DICOM slices of one series with relative paths only, or raise RAYTSEG_MAX_ARCHIVE_BYTES."
)


def read_zip(stream: io.BufferedIOBase, limits: ArchiveLimits, name: str) -> list[tuple[str, bytes]]:
    """Every member's bytes, in memory; nothing is extracted."""
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnreadableImageError(f"{name} is not a readable zip file ({exc}). Re-create the zip.") from exc
    with archive:
        infos = archive.infolist()
        check_members(infos, limits, name, ARCHIVE_ADVICE)
        budget = ByteBudget(limits.total_bytes, name, ARCHIVE_ADVICE)
        return [
            (info.filename, _read_member(archive, info, budget, name)) for info in infos if not info.is_dir()
        ]


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: ByteBudget, name: str) -> bytes:
    out = io.BytesIO()
    try:
        copy_member(archive, info, out, budget)
    except InputError:
        raise
    except Exception as exc:
        raise UnreadableImageError(
            f"Could not read {info.filename!r} from {name} ({exc}). Re-create the zip."
        ) from exc
    return out.getvalue()


def read_dicom_dir(folder: Path) -> list[Any]:
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


def datasets_from_blobs(blobs: Iterable[tuple[str, bytes]]) -> list[Any]:
    datasets = [_dcmread(io.BytesIO(blob), name) for name, blob in blobs if _is_dicom(blob, io.BytesIO(blob))]
    return imaging_only(datasets)


def imaging_only(datasets: Iterable[Any]) -> list[Any]:
    """The datasets dicom2nifti would convert (images, not reports or presentation states)."""
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


def dicom_volume(datasets: list[Any], origin: str, max_voxels: int) -> Volume:
    """One series of DICOM datasets as a ``Volume``, checked from the headers before conversion.

    Localizers are left out, the largest usable series is chosen and awkward stacks
    (gantry tilt, jittered positions, multi-frame) are converted or refused: see
    ``raytseg.pipeline.dicom_series``. ``Volume.series`` holds the slices actually used.
    """
    if not datasets:
        raise UnreadableImageError(
            f"No DICOM image files found in {origin}. Pass a NIfTI file, or a folder or zip that holds "
            "the DICOM slices of one series."
        )
    stack = select_stack(datasets, origin)
    _check_dicom_size(stack.datasets, max_voxels, origin)
    modality = str(stack.datasets[0].get("Modality") or "") or None
    img = _convert_dicom(stack, origin)
    volume = volume_from_image(img, f"{origin} (DICOM, {len(stack.datasets)} files)", max_voxels, modality)
    return dataclasses.replace(volume, series=tuple(_header_only(ds) for ds in stack.datasets))


# Pixel Data, Float Pixel Data, Double Float Pixel Data
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _header_only(dataset: Any) -> Any:
    """A new dataset with a slice's elements but its pixel data (the export stage needs the
    rest); nothing refers back to the file or buffer it was read from."""
    from pydicom.dataset import Dataset, FileMetaDataset

    # keys(), not the dataset itself: iterating a Dataset would read the deferred pixel data
    tags = [tag for tag in dataset.keys() if tag not in _PIXEL_TAGS]  # noqa: SIM118
    header = Dataset({tag: dataset[tag] for tag in tags})
    header.file_meta = FileMetaDataset(dataset.file_meta)
    return header


def _check_dicom_size(datasets: list[Any], max_voxels: int, origin: str) -> None:
    """Rows x columns x frames of every slice, from the headers, before any pixel is decoded."""
    try:
        voxels = sum(
            int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("NumberOfFrames") or 1)
            for ds in datasets
        )
    except (TypeError, ValueError) as exc:
        raise UnreadableImageError(f"{origin} has DICOM slices with invalid sizes ({exc}).") from exc
    if voxels > max_voxels:
        raise ImageTooLargeError(
            f"{origin} has {voxels} voxels, more than the limit of {max_voxels}. "
            "Pass a smaller series, or raise RAYTSEG_MAX_VOXELS."
        )


def _convert_dicom(stack: Stack, origin: str) -> nib.Nifti1Image:
    """``dicom_series_to_nifti(..., reorient_nifti=True)`` then ``nib.load``, without files;
    a regular stack exactly so, the others as ``_convert_awkward`` says."""
    from dicom2nifti.convert_dicom import dicom_array_to_nifti
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    try:
        if stack.layout == "regular":
            # With reorient_nifti=True dicom2nifti insists on writing the file; reorient here instead.
            converted = dicom_array_to_nifti(stack.datasets, None, reorient_nifti=False)
            reoriented = _reorient_like_dicom2nifti(converted["NII"])
        else:
            reoriented = _convert_awkward(stack)
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


# dicom2nifti's settings are module globals: changed for one conversion, then restored.
_SETTINGS_LOCK = threading.RLock()


@contextlib.contextmanager
def _dicom2nifti_settings(**values: Any) -> Iterator[None]:
    """dicom2nifti's ``settings`` with ``values`` for the block, then as they were. The lock
    keeps two such blocks apart; a regular stack never changes them."""
    import dicom2nifti.settings as settings

    with _SETTINGS_LOCK:
        saved = {name: getattr(settings, name) for name in values}
        try:
            for name, value in values.items():
                setattr(settings, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(settings, name, value)


def _convert_awkward(stack: Stack) -> nib.Nifti1Image:
    """A stack ``select_stack`` checked, with dicom2nifti's checks of the slice positions
    (which the stack passed in its own way) off: jittered slices land on the regular grid
    through the end slices (dicom2nifti's affine), a tilted stack is resampled by dicom2nifti
    onto an orthogonal grid (its ``resample`` step, padded with the image's minimum: air,
    not water), a multi-frame instance gets the rescale that dicom2nifti reads only from
    per-frame groups."""
    from dicom2nifti.convert_dicom import dicom_array_to_nifti
    from dicom2nifti.resample import resample_nifti_images

    # A multi-frame instance keeps dicom2nifti's checks: select_stack did not look at its frames.
    unchecked = {"validate_orthogonal": False, "validate_slice_increment": False}
    with _dicom2nifti_settings(**({} if stack.layout == "multiframe" else unchecked)):
        converted = dicom_array_to_nifti(stack.datasets, None, reorient_nifti=False)
    nii = converted["NII"]
    if stack.layout == "multiframe":
        nii = _rescale_multiframe(nii, stack.datasets[0])
    reoriented = _reorient_like_dicom2nifti(nii)
    if stack.layout != "tilted":
        return reoriented
    padding = np.asanyarray(reoriented.dataobj).min()
    with _dicom2nifti_settings(resample_padding=padding):
        resampled: nib.Nifti1Image = resample_nifti_images([reoriented])
    resampled.header.set_slope_inter(1, 0)
    resampled.header.set_xyzt_units(2)
    return resampled


def _rescale_multiframe(nii: Any, dataset: Any) -> Any:
    """Apply a rescale that only the shared functional groups carry (dicom2nifti reads the
    per-frame ones), as pydicom's modality LUT applies it to a single-frame slice."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    shared = dataset.get("SharedFunctionalGroupsSequence") or []
    if any("PixelValueTransformationSequence" in frame for frame in per_frame):
        return nii
    if not shared or "PixelValueTransformationSequence" not in shared[0]:
        return nii
    transform = shared[0].PixelValueTransformationSequence[0]
    slope, intercept = float(transform.RescaleSlope), float(transform.RescaleIntercept)
    data = np.asanyarray(nii.dataobj).astype(np.float64) * slope + intercept
    return nib.Nifti1Image(data, nii.affine)


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
