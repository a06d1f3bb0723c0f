"""Where a DICOM input's slices sit in the image raytseg segmented.

DICOM outputs describe the source slices: one frame per slice, in the slice's own rows and
columns. The converted image may have its axes permuted and flipped (dicom2nifti turns a
series into LAS), so the way back is computed from both geometries, never assumed:
``SliceGrid`` gives, for each axis of the frames (slice, row, column), the image axis and
direction it runs along. It is exact or refused, so a structure on the patient's left stays
on the left (TotalSegmentator wrote front-to-back mirrored DICOM until 2.18).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raytseg.errors import DicomOutputError

# LPS (DICOM patient coordinates) to RAS (NIfTI world coordinates) and back.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# How far (in voxels) a slice may sit off the image grid and still be that grid's slice.
_TOLERANCE = 0.01


@dataclass(frozen=True)
class SliceGrid:
    """The source slices in frame order, and how the image's axes map onto the frames."""

    slices: tuple[Any, ...]  # pydicom datasets, sorted along the slice normal
    axes: tuple[int, int, int]  # image axis of the frames' (slice, row, column) axes
    flips: tuple[bool, bool, bool]  # whether each of those runs against the image axis

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.slices[0]
        return (len(self.slices), int(first.Rows), int(first.Columns))


def slice_grid(series: tuple[Any, ...], affine: np.ndarray, shape: tuple[int, ...]) -> SliceGrid:
    """The frames of ``series`` on the image of ``affine`` and ``shape``, or ``DicomOutputError``."""
    _check_single_frames(series)
    slices = _sorted_slices(series)
    to_voxel = np.linalg.inv(affine) @ _LPS_TO_RAS @ _frame_affine(slices)
    axes, flips = _axis_mapping(to_voxel, shape)
    grid = SliceGrid(slices, axes, flips)
    if tuple(shape[a] for a in axes) != grid.shape:
        raise _mismatch(f"the image has shape {tuple(shape)}, the slices make {grid.shape}")
    return grid


def _check_single_frames(series: tuple[Any, ...]) -> None:
    if not series:
        raise DicomOutputError(
            "DICOM outputs (dicom_seg, dicom_rtstruct) describe a DICOM input, and this input is "
            "NIfTI. Pass the DICOM series, or ask for output_type nifti."
        )
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in series):
        raise DicomOutputError(
            "DICOM outputs for multi-frame (enhanced) DICOM input are not supported yet. "
            "Ask for output_type nifti."
        )
    orientations = {tuple(round(float(v), 4) for v in ds.ImageOrientationPatient) for ds in series}
    if len(orientations) != 1:
        raise _mismatch(f"the slices have {len(orientations)} different orientations")


def _sorted_slices(series: tuple[Any, ...]) -> tuple[Any, ...]:
    normal = _normal(series[0])
    return tuple(sorted(series, key=lambda ds: float(np.dot(normal, position(ds)))))


def _frame_affine(slices: tuple[Any, ...]) -> np.ndarray:
    """(column, row, slice) index -> LPS millimetres, from the sorted slices' headers."""
    first = slices[0]
    row_cosine, column_cosine = cosines(first)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    if len(slices) > 1:
        step = (position(slices[-1]) - position(first)) / (len(slices) - 1)
    else:
        step = _normal(first) * float(first.get("SliceThickness") or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # along a row: the next column
    affine[:3, 1] = column_cosine * row_spacing  # down a column: the next row
    affine[:3, 2] = step
    affine[:3, 3] = position(first)
    return affine


def _axis_mapping(
    to_voxel: np.ndarray, shape: tuple[int, ...]
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For frame axes (slice, row, column): the image axis each runs along, and its direction."""
    axes, flips = [], []
    for frame_axis in (2, 1, 0):  # columns of to_voxel: column, row, slice index
        column = to_voxel[:3, frame_axis]
        image_axis = int(np.argmax(np.abs(column)))
        unit = np.zeros(3)
        unit[image_axis] = np.sign(column[image_axis])
        if not np.allclose(column, unit, atol=_TOLERANCE):
            raise _mismatch("the slices are not the image's voxel grid (resampled, tilted or oblique)")
        flipped = bool(unit[image_axis] < 0)
        start = shape[image_axis] - 1 if flipped else 0
        if abs(to_voxel[image_axis, 3] - start) > _TOLERANCE:
            raise _mismatch("the slices are offset from the image's voxel grid")
        axes.append(image_axis)
        flips.append(flipped)
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def _mismatch(detail: str) -> DicomOutputError:
    return DicomOutputError(
        f"DICOM outputs must match the source slices one to one, and here {detail}. "
        "Ask for output_type nifti."
    )


def cosines(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([float(v) for v in ds.ImageOrientationPatient])
    return values[:3], values[3:]


def _normal(ds: Any) -> np.ndarray:
    row_cosine, column_cosine = cosines(ds)
    return np.asarray(np.cross(row_cosine, column_cosine))


def position(ds: Any) -> np.ndarray:
    return np.array([float(v) for v in ds.ImagePositionPatient])
