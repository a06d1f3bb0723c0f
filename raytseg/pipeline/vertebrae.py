"""``vertebrae_pp`` relabelling, ported from TotalSegmentator ``postprocessing.py`` (Apache-2.0).

The model segments vertebral bodies only; neighbouring labels must never touch. When
they do, connected bodies are relabelled in anatomical order, then every vertebra is
dilated by 3 mm (undoing the erosion applied to the training labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_BODY_MM3 = 100
DILATION_MM = 3.0


def postprocess_vertebrae_pp(
    data: np.ndarray, label_map: dict[int, str], voxel_volume: float, spacing: Sequence[float]
) -> np.ndarray:
    """Relabel touching vertebrae and dilate them, as TotalSegmentator does."""
    from scipy import ndimage

    data = data.astype(np.uint8, copy=False)
    if not _labels_touch(data):
        return dilate_labels(data, label_map, spacing, DILATION_MM)
    components, _ = ndimage.label(data > 0)
    sizes = np.bincount(components.ravel())
    keep = np.flatnonzero(sizes * voxel_volume >= MIN_BODY_MM3)
    keep = keep[keep != 0]
    if len(keep) == 0:
        return np.zeros_like(data)
    keep_mask = np.zeros(sizes.shape, dtype=bool)
    keep_mask[keep] = True
    kept = keep_mask[components]
    cleaned = data.copy()
    cleaned[~kept] = 0
    present = sorted(int(v) for v in np.unique(cleaned) if int(v) in label_map)
    if not present:
        return np.zeros_like(data)
    out = _relabel(components, kept, keep, present, label_map)
    return dilate_labels(out, label_map, spacing, DILATION_MM)


def _relabel(
    components: np.ndarray, kept: np.ndarray, keep: np.ndarray, present: list[int], label_map: dict[int, str]
) -> np.ndarray:
    from scipy import ndimage

    inverse = {v: k for k, v in label_map.items()}
    c1, l5 = inverse["vertebrae_C1"], inverse["vertebrae_L5"]
    from_top = l5 not in present and c1 in present
    centers = ndimage.center_of_mass(kept, components, keep)
    if len(keep) == 1:
        centers = [centers]
    order = sorted(
        zip(keep, (c[2] for c in centers), strict=True), key=lambda item: item[1], reverse=from_top
    )
    labels = range(c1, max(label_map) + 1) if from_top else range(max(present), min(label_map) - 1, -1)
    out = np.zeros(components.shape, dtype=np.uint8)
    # More components than labels: TotalSegmentator labels as many as fit.
    for (component, _), label in zip(order, labels, strict=False):
        out[components == component] = label
    return out


def _labels_touch(data: np.ndarray) -> bool:
    for axis in range(data.ndim):
        a = np.take(data, range(1, data.shape[axis]), axis=axis)
        b = np.take(data, range(0, data.shape[axis] - 1), axis=axis)
        if np.any((a > 0) & (b > 0) & (a != b)):
            return True
    return False


def _ellipsoid(spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    radii = [radius_mm / s for s in spacing]
    grids = np.ogrid[-radii[0] : radii[0] + 1, -radii[1] : radii[1] + 1, -radii[2] : radii[2] + 1]
    inside: np.ndarray = sum((g * g) / (r * r) for g, r in zip(grids, radii, strict=True)) <= 1  # type: ignore[assignment]
    return inside


def dilate_labels(
    data: np.ndarray, label_map: dict[int, str], spacing: Sequence[float], mm: float
) -> np.ndarray:
    """Dilate each label into background only, within its bounding box plus the radius."""
    from scipy.ndimage import binary_dilation

    if mm <= 0:
        return data
    structure = _ellipsoid(spacing, mm)
    radius = np.ceil([mm / s for s in spacing]).astype(int)
    out = data.copy()
    for label in sorted(label_map):
        coords = np.where(data == label)
        if len(coords[0]) == 0:
            continue
        box = tuple(
            slice(max(int(c.min()) - r, 0), min(int(c.max()) + r + 1, data.shape[axis]))
            for axis, (c, r) in enumerate(zip(coords, radius, strict=True))
        )
        grown = binary_dilation(data[box] == label, structure=structure)
        region = out[box]
        region[(region == 0) & grown] = label
    return out
