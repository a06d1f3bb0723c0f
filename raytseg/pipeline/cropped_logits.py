"""TotalSegmentator's cropped-logits export (``-ho``): logits to the input grid class by class.

TotalSegmentator 2.18 replaces nnU-Net's export at run time (its
``nnunet_runtime_patches.py``). With ``--higher_order_resampling`` the model sees the image
on its own grid, and instead of resampling every class's logits to that grid and taking
the argmax, the export resamples the background channel whole (nnU-Net's own function),
then each class predicted on the model's grid only inside its box grown by 3 voxels, at
order 1 with scipy's ``map_coordinates``; a class takes the voxels where it beats the best
score so far. The steps, their order and the dtypes (the scores are kept in the logits'
float16) are the same here, so the labels are too; the peak is one full-grid channel
instead of all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raytseg.pipeline.records import CaseGeometry

MARGIN = 3  # voxels of the model's grid around each class's box
_Box = tuple[np.ndarray, np.ndarray]
_Placed = tuple[tuple[slice, ...], np.ndarray]


def labels_from_cropped_logits(logits: np.ndarray, predictor: Any, geometry: CaseGeometry) -> np.ndarray:
    """uint8 labels on nnU-Net's cropped input grid (``shape_after_cropping_and_before_resampling``)."""
    config = predictor.configuration_manager
    shape = geometry.shape_after_cropping_and_before_resampling
    spacing = [geometry.spacing[i] for i in predictor.plans_manager.transpose_forward]
    current = config.spacing if len(config.spacing) == len(shape) else [spacing[0], *config.spacing]
    background = config.resampling_fn_probabilities(logits[:1], np.array(shape), current, spacing)
    best = np.asarray(background[0])
    labels = np.zeros(shape, dtype=np.uint8)
    lowres = np.argmax(logits, axis=0)
    for class_id in (int(c) for c in np.unique(lowres) if c != 0):
        placed = _resampled_box(logits[class_id], shape, _box(lowres == class_id))
        if placed is None:
            continue
        where, scores = placed
        better = scores > best[where]
        labels[where][better] = class_id
        best[where][better] = scores[better]
    return labels


def _box(mask: np.ndarray) -> _Box:
    found = np.nonzero(mask)
    start = np.maximum(np.array([axis.min() for axis in found]) - MARGIN, 0)
    end = np.minimum(np.array([axis.max() + 1 for axis in found]) + MARGIN, mask.shape)
    return start, end


def _resampled_box(channel: np.ndarray, shape: tuple[int, ...], box: _Box) -> _Placed | None:
    """The channel inside ``box``, resampled onto its part of the target grid (voxel centres
    mapped as nnU-Net's resize maps them), and where that part lies; None if it is empty."""
    from scipy.ndimage import map_coordinates

    old, new = np.array(channel.shape), np.array(shape, dtype=int)
    scale = new / old
    start = np.maximum(np.floor(box[0] * scale).astype(int), 0)
    end = np.minimum(np.ceil(box[1] * scale).astype(int), new)
    if np.any(end <= start):
        return None
    crop = channel[tuple(slice(lo, hi) for lo, hi in zip(*box, strict=True))].astype(float, copy=False)
    axes = [
        (np.arange(lo, hi, dtype=np.float32) + 0.5) * old_n / new_n - 0.5 - offset
        for lo, hi, old_n, new_n, offset in zip(start, end, old, new, box[0], strict=True)
    ]
    coordinates = np.array(np.meshgrid(*axes, indexing="ij"), dtype=np.float32)
    scores = map_coordinates(crop, coordinates, order=1, mode="nearest")
    return tuple(slice(lo, hi) for lo, hi in zip(start, end, strict=True)), scores
