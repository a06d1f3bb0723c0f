"""Per-class volume and intensity, as TotalSegmentator's ``--statistics`` computes them.

``basic_statistics`` returns the same numbers as TotalSegmentator's
``statistics.get_basic_statistics`` but reads the volume a fixed number of times instead
of once per class: voxel counts and intensity sums for every label come from one
chunked ``np.bincount`` pass, bounding boxes from one ``scipy.ndimage.find_objects``
pass, and the remaining per-class work (median, ``extra``) looks only inside the box.

Why the numbers are identical: TotalSegmentator averages the int16 image with
``np.average(ct, weights=mask)``. Every product and partial sum there is an integer far
below 2**53, so float64 holds it exactly whatever the summation order; the mean is one
correctly rounded division of the same two integers here. Medians depend only on the
values, and the ``extra`` metrics see the same values in the same (C) order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Stats = dict[str, dict[str, Any]]

_BORDER = 3  # voxels; TotalSegmentator's touches_border
_CHUNK_VOXELS = 1 << 22  # bincount casts labels to intp: keep that copy small


def basic_statistics(  # noqa: PLR0913 - TotalSegmentator's options, keyword-only
    labels: np.ndarray,
    image: np.ndarray,
    zooms: tuple[float, float, float],
    classes: dict[int, str],
    *,
    include_incomplete: bool = False,
    aggregation: Literal["mean", "median"] = "mean",
    extra: bool = False,
    normalized: bool = False,
) -> Stats:
    """Volume (mm³) and mean or median intensity of every class.

    ``image``: the stored values, scaling applied; cast to int16 after float64 as
    TotalSegmentator does (``get_fdata().astype(np.int16)``). ``zooms``: as the header
    stores them (float32); the voxel volume is their float32 product. ``classes``:
    ``{label id: name}``, the result's order. Options, as TotalSegmentator's:
    ``include_incomplete`` (``-sii``: also classes within 3 voxels of the border, else
    zeros), ``aggregation`` (``-sa``), ``extra`` (``-sx``: ``n_voxels``,
    ``intensity_std/min/max``, ``centroid_vox``, ``bbox_vox``), ``normalized``
    (``statistics_normalized_intensities``: ``(ct - ct.min()) / (ct.max() - ct.min())``
    over the image; medians on the scaled values as TotalSegmentator computes them, means
    from the exact integer mean, equal to its float64 average after rounding).

    Returns ``{class name: {"volume": …, "intensity": …, …}}`` with Python floats, rounded
    where TotalSegmentator rounds.
    """
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    ct = _as_int16(image)
    tables = _Tables.build(labels, ct, zooms, classes, boxes=aggregation == "median" or extra)
    if normalized:
        tables = dataclasses.replace(tables, scale=(ct.min(initial=0), ct.max(initial=0)))
    empty = {"volume": 0.0, "intensity": 0.0, **(_EMPTY_EXTRA if extra else {})}
    return {
        name: dict(empty)
        if tables.border[k] and not include_incomplete
        else tables.measure(k, aggregation=aggregation, extra=extra)
        for k, name in classes.items()
    }


def statistics_json(stats: Stats) -> bytes:
    """statistics.json content, formatted as TotalSegmentator writes it."""
    return json.dumps(stats, indent=4).encode("utf-8")


def label_counts_and_sums(
    labels: np.ndarray, image: np.ndarray | None, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and integer intensity sum per label id, in one pass over slabs.

    Returns int64 arrays of length ``n_bins`` (labels >= n_bins are not counted); the
    sums are zeros when ``image`` is None. ``image`` must hold integers.
    """
    counts = np.zeros(n_bins, dtype=np.int64)
    sums = np.zeros(n_bins, dtype=np.int64)
    if labels.size == 0:
        return counts, sums
    plane = max(1, labels.size // labels.shape[0])
    step = max(1, _CHUNK_VOXELS // plane)
    for start in range(0, labels.shape[0], step):
        lab = labels[start : start + step].ravel()
        counts += np.bincount(lab, minlength=n_bins)[:n_bins]
        if image is not None:
            # float64 weights hold these integer sums exactly (< 2**53 per slab)
            vals = image[start : start + step].ravel()
            sums += np.bincount(lab, weights=vals, minlength=n_bins)[:n_bins].astype(np.int64)
    return counts, sums


def read_segmentation_labels(
    source: str, task: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, dict[int, str]]:
    """Labels and class names of an existing segmentation, for ``raytseg stats``.

    ``source`` is a multilabel NIfTI or a folder of per-class masks (``readback``);
    ``task``'s classes apply where the source does not name them. The segmentation
    must have the image's ``shape`` (``InvalidImageError`` otherwise).
    """
    from raytseg.errors import InvalidImageError
    from raytseg.pipeline.readback import read_segmentation
    from raytseg.tasks import get_task

    hint = "Pass the output folder of `raytseg segment` and its --task."
    seg = read_segmentation(source, get_task(task).classes, hint)
    if seg.labels.shape != tuple(shape):
        raise InvalidImageError(f"{source} has shape {seg.labels.shape} but the image has {tuple(shape)}.")
    return seg.labels, seg.classes


@dataclass(frozen=True)
class _Tables:
    """Everything measured once for all labels; ``measure`` then works per class."""

    labels: np.ndarray
    ct: np.ndarray  # int16
    counts: np.ndarray  # voxels per label id
    sums: np.ndarray  # int16 intensity sum per label id
    border: np.ndarray  # bool per label id: within 3 voxels of a face
    boxes: list[tuple[slice, ...] | None]  # bounding box per label id - 1 (find_objects)
    vox_vol: np.float32
    scale: tuple[np.int16, np.int16] | None = None  # (min, max) when intensities are normalised

    @classmethod
    def build(
        cls,
        labels: np.ndarray,
        ct: np.ndarray,
        zooms: tuple[float, float, float],
        classes: dict[int, str],
        *,
        boxes: bool,
    ) -> _Tables:
        import scipy.ndimage as ndi

        n_bins = max(max(classes, default=0), int(labels.max(initial=0))) + 1
        counts, sums = label_counts_and_sums(labels, ct, n_bins)
        return cls(
            labels=labels,
            ct=ct,
            counts=counts,
            sums=sums,
            border=_border_touching(labels, n_bins),
            boxes=ndi.find_objects(labels, max_label=n_bins - 1) if boxes else [],
            # TotalSegmentator multiplies the header's float32 zooms: a float32 product
            vox_vol=np.float32(zooms[0]) * np.float32(zooms[1]) * np.float32(zooms[2]),
        )

    def measure(self, k: int, *, aggregation: str, extra: bool) -> dict[str, Any]:
        count = int(self.counts[k])
        volume = np.int64(count) * self.vox_vol  # int64 * float32 -> float64, as data.sum() * vox_vol
        entry: dict[str, Any] = {"volume": float(volume)}
        if count == 0:
            entry["intensity"] = 0.0
            return {**entry, **_EMPTY_EXTRA} if extra else entry
        if aggregation == "mean":
            mean = np.float64(self.sums[k]) / np.float64(count)
            entry["intensity"] = float(np.round(self._scaled(mean), 5))
        box = self.boxes[k - 1] if self.boxes else None
        if box is not None:
            mask = self.labels[box] == k
            ct = self._scaled(self.ct[box])
            if aggregation == "median":
                entry["intensity"] = float(np.round(np.median(ct[mask]), 5))
            if extra:
                entry.update(_extra_metrics(mask, ct, box))
        return entry

    def _scaled(self, values: Any) -> Any:
        """``values`` in TotalSegmentator's normalisation (same int16 then float64 steps)."""
        if self.scale is None:
            return values
        low, high = self.scale
        return (values - low) / (high - low)


def _as_int16(image: np.ndarray) -> np.ndarray:
    """``get_fdata().astype(np.int16)``, slab by slab to bound the float64 copy."""
    if image.dtype in (np.int16, np.int8, np.uint8):
        return image.astype(np.int16, copy=False)
    out = np.empty(image.shape, dtype=np.int16)
    plane = max(1, image.size // max(1, image.shape[0]))
    step = max(1, _CHUNK_VOXELS // plane)
    for start in range(0, image.shape[0], step):
        out[start : start + step] = np.asarray(image[start : start + step], dtype=np.float64).astype(np.int16)
    return out


def _border_touching(labels: np.ndarray, n_bins: int) -> np.ndarray:
    """Per label id: does it occur within 3 voxels of any face (TotalSegmentator's touches_border)?"""
    touching = np.zeros(n_bins, dtype=bool)
    for axis in range(labels.ndim):
        for sl in (slice(None, _BORDER), slice(-_BORDER, None)):
            index = [slice(None)] * labels.ndim
            index[axis] = sl
            present = np.unique(labels[tuple(index)])
            touching[present[present < n_bins]] = True
    return touching


_EMPTY_EXTRA: dict[str, Any] = {
    "n_voxels": 0,
    "intensity_std": 0.0,
    "intensity_min": 0.0,
    "intensity_max": 0.0,
    "centroid_vox": None,
    "bbox_vox": None,
}


def _extra_metrics(mask: np.ndarray, ct: np.ndarray, box: tuple[slice, ...]) -> dict[str, Any]:
    """Ported from TotalSegmentator statistics.py ``_add_extra_metrics``, on a bounding-box crop."""
    idx = np.argwhere(mask) + np.array([s.start for s in box], dtype=np.int64)
    vals = ct[mask]  # C order inside the box == C order of the whole volume
    return {
        "n_voxels": int(idx.shape[0]),
        "intensity_std": float(np.std(vals).round(5)),
        "intensity_min": float(vals.min()),
        "intensity_max": float(vals.max()),
        "centroid_vox": [round(float(c), 2) for c in idx.mean(axis=0)],
        "bbox_vox": [[int(idx[:, a].min()), int(idx[:, a].max())] for a in range(idx.shape[1])],
    }
