"""The one place where voxel axes and spacings change convention.

raytseg keeps images in nibabel's voxel order (i, j, k). nnU-Net reads NIfTI files with
SimpleITK or nibabel and transposes them to (z, y, x) with the spacing reversed; models
were trained that way, so the network must see exactly that.

TotalSegmentator hands images to nnU-Net through NIfTI files. A file stores spacing as
float32, so the spacing nnU-Net sees is the float32-rounded one; ``nifti_zooms`` gives the
same numbers without writing a file, which is what makes in-memory preprocessing
reproduce TotalSegmentator's decisions (e.g. whether nnU-Net resamples).

DICOM outputs index labels as the source's frames (slice, row, column): ``to_frames``,
with the mapping ``raytseg.pipeline.dicomgrid`` derives from both geometries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from raytseg.pipeline.records import Spacing

if TYPE_CHECKING:
    from raytseg.pipeline.dicomgrid import SliceGrid


def to_network(data: np.ndarray) -> np.ndarray:
    """(i, j, k) image -> (1, z, y, x) network input layout (a view, no copy)."""
    return data.transpose(2, 1, 0)[None]


def from_network(labels: np.ndarray) -> np.ndarray:
    """(z, y, x) network output -> (i, j, k) (a view, no copy)."""
    return labels.transpose(2, 1, 0)


def spacing_to_network(zooms: Spacing) -> Spacing:
    return (zooms[2], zooms[1], zooms[0])


def nifti_zooms(affine: np.ndarray) -> Spacing:
    """Voxel sizes a NIfTI header would store for ``affine`` (float32, like a written file)."""
    header = nib.Nifti1Image(np.zeros((1, 1, 1), dtype=np.uint8), affine).header
    z = header.get_zooms()
    return (float(z[0]), float(z[1]), float(z[2]))


def to_frames(labels: np.ndarray, grid: SliceGrid) -> np.ndarray:
    """(i, j, k) labels -> DICOM frames (slice, row, column) of ``grid`` (a view, no copy)."""
    frames = labels.transpose(grid.axes)
    flipped = tuple(slice(None, None, -1) if f else slice(None) for f in grid.flips)
    return frames[flipped]
