"""Stand-ins for tests of what surrounds the network: no nnU-Net, no weights read; and an
independent reader of DICOM-SEG files for tests of the DICOM outputs (``seg_masks``).

    segmenter = Segmenter(store, torch.device("cpu"), load_network=fake_networks())

``FakeNetwork`` answers a ``NetworkInput`` with labels in exactly the layout the real model
stage returns (the canonical chunk's voxel order and shape), so everything before and after
the network runs for real. The labels are intensity-rank bands, deterministic and cheap;
they mean nothing, like the labels of random weights.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytseg.pipeline.axes import from_network
from raytseg.pipeline.preprocess import ModelPlans
from raytseg.pipeline.records import NetworkInput, NetworkOutput
from raytseg.tasks import ModelSpec

__all__ = ["FakeNetwork", "fake_networks", "seg_masks"]


@dataclass
class FakeNetwork:
    """Labels voxels by intensity rank: ``len(classes) + 1`` equal bands, the darkest one
    background, band ``b`` class ``classes[b - 1]`` (the model's own label ids).

    Ranks rather than values, so that every class gets its share of voxels even where many
    voxels share one value (air in a CT).
    """

    key: str
    classes: Sequence[int]
    transpose_backward: tuple[int, ...] = (0, 1, 2)

    def predict(self, item: NetworkInput) -> NetworkOutput:
        data = item.data[0]
        order = np.argsort(data, axis=None, kind="stable")
        bands = np.empty(data.size, dtype=np.int64)
        bands[order] = np.arange(data.size) * (len(self.classes) + 1) // max(data.size, 1)
        lookup = np.array([0, *self.classes], dtype=np.uint8)
        geometry = item.geometry
        labels = _nearest(
            lookup[bands].reshape(data.shape), geometry.shape_after_cropping_and_before_resampling
        )
        full = np.zeros(geometry.shape_before_cropping, dtype=np.uint8)
        full[tuple(slice(lo, hi) for lo, hi in geometry.bbox_used_for_cropping)] = labels
        canonical = from_network(full.transpose(self.transpose_backward))
        return NetworkOutput(self.key, item.chunk, np.ascontiguousarray(canonical), backend="fake")


def fake_networks(absent: Collection[str] = ()) -> Callable[[ModelSpec, ModelPlans], FakeNetwork]:
    """A ``Segmenter(load_network=...)`` that builds fakes predicting every label of each
    model's dataset.json except the class names in ``absent``."""

    def load(spec: ModelSpec, plans: ModelPlans) -> FakeNetwork:
        labels: dict[str, int] = plans.dataset_json["labels"]
        predicted = sorted(int(i) for name, i in labels.items() if int(i) != 0 and name not in absent)
        backward = tuple(int(axis) for axis in plans.plans.get("transpose_backward", (0, 1, 2)))
        return FakeNetwork(plans.model_key, predicted, backward)

    return load


def _nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` resized to ``shape`` by nearest neighbour (when nnU-Net would resample)."""
    if labels.shape == tuple(shape):
        return labels
    index = np.ix_(*(np.arange(n) * size // n for n, size in zip(shape, labels.shape, strict=True)))
    return labels[index]


# LPS (DICOM patient coordinates) to RAS (NIfTI world coordinates): its own inverse.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def seg_masks(data: bytes, affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Each segment of a DICOM-SEG (by label) as a mask on the grid of ``affine`` and ``shape``.

    Frames are placed by their own Image Position (Patient) and the shared orientation and
    pixel spacing, not by what they reference: a reader independent of how raytseg (or
    TotalSegmentator) ordered them. BINARY and LABELMAP segmentations; a LABELMAP's
    background segment (number 0) is left out.
    """
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence if int(s.SegmentNumber)}
    pixels = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    masks = {name: np.zeros(shape, dtype=bool) for name in names.values()}
    to_voxel = np.linalg.inv(affine) @ _LPS_TO_RAS
    voxels_at: dict[tuple[float, ...], np.ndarray] = {}  # frames of one plane share it
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        position = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        if position not in voxels_at:
            lps = _pixel_positions(ds, position)
            voxels_at[position] = np.rint(lps @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
        voxels = voxels_at[position]
        if "SegmentIdentificationSequence" in item:  # BINARY: one segment per frame
            hits = {int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber): frame > 0}
        else:  # LABELMAP: pixel values are segment numbers
            hits = {number: frame == number for number in names}
        for number, hit in hits.items():
            i, j, k = voxels[hit].T
            masks[names[number]][i, j, k] = True
    return masks


def _pixel_positions(ds: Any, position: Any) -> np.ndarray:
    """LPS coordinates (rows, columns, 3) of every pixel of a frame at ``position``."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    r, c = np.indices((int(ds.Rows), int(ds.Columns)))
    origin = np.array([float(v) for v in position])
    along_row, along_column = orientation[:3], orientation[3:]
    positions: np.ndarray = origin + c[..., None] * column_spacing * along_row
    positions += r[..., None] * row_spacing * along_column
    return positions
