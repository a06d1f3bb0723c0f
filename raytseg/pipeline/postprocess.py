"""Postprocess stage: model-grid labels -> a Segmentation on the input's voxel grid.

Order as in TotalSegmentator's ``nnUNet_predict_image``:

1. merge part models into the task's label numbering (later parts win on overlap) and
   stitch z chunks;
2. task postprocessing at model resolution (auxiliary labels, ``body`` blob rules,
   ``vertebrae_pp`` relabelling, ``--remove_small_blobs``);
3. nearest-neighbour resampling back to the pre-resampling shape with the exact
   pre-resampling affine, undo the RAS reorientation, paste into the uncropped image;
4. final label operations (binarise, a refining pass's mask, roi_subset filter, remove
   outside a mask);
5. ``-v1o``: TotalSegmentator 1's numbering (``renumber``), once the statistics are taken.

The blob functions are ported from TotalSegmentator ``postprocessing.py`` (Apache-2.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from raytseg.errors import ModelError
from raytseg.pipeline.plan import ModelRun, Renumbering
from raytseg.pipeline.preprocess import model_key
from raytseg.pipeline.records import ChunkSplit, InverseRecord, NetworkOutput, Segmentation
from raytseg.pipeline.zoom import resample

if TYPE_CHECKING:
    import torch

BODY_EXTREMITIES_MIN_MM3 = 50_000
_ONE_HOT_MARGIN = 2  # voxels around a class's box (TotalSegmentator: max(2, order + 1), order 1)


@dataclass(frozen=True)
class FinalOps:
    """Label operations applied on the input grid after resampling back."""

    roi_ids: tuple[int, ...] | None = None
    keep_inside: np.ndarray | None = None  # boolean mask on the input grid
    keep_inside_dilation_mm: float = 0.0
    refine_inside: np.ndarray | None = None  # a refining pass's mask (vertebrae_pp_refined)
    refine_dilation_mm: float = 0.0
    remove_small_blobs_mm3: float | None = None
    # --higher_order_resampling_LEGACY: back to the input grid with ``upsample_one_hot``
    one_hot_upsampling: bool = False
    # -sl: stay on the model's grid (only reoriented back), with that grid's header
    model_grid: bool = False


_NO_OPS = FinalOps()


def merge_outputs(outputs: Sequence[NetworkOutput], run: ModelRun, split: ChunkSplit | None) -> np.ndarray:
    """Part models mapped into the task's numbering with TotalSegmentator's lookup table."""
    by_model = {(o.model_key, o.chunk): o.labels for o in outputs}
    inverse = {name: idx for idx, name in run.classes.items()}
    n_chunks = 1 if split is None else 3
    merged: list[np.ndarray] | None = None
    for spec in run.models:
        parts = [by_model.get((model_key(spec), c)) for c in range(n_chunks)]
        if any(p is None for p in parts):
            raise ModelError(f"Missing prediction of model {model_key(spec)}.")
        chunks = [p for p in parts if p is not None]
        if not run.multi_model:
            merged = [c.copy() for c in chunks]
            break
        lut = np.zeros(max(max(spec.labels) + 1, 256), dtype=np.uint8)
        for local, name in spec.labels.items():
            lut[local] = inverse[name]
        merged = merged or [np.zeros_like(c) for c in chunks]
        for target, chunk in zip(merged, chunks, strict=True):
            mapped = lut[chunk]
            np.copyto(target, mapped, where=mapped != 0)
    assert merged is not None
    return merged[0] if split is None else stitch_chunks(merged, split)


def stitch_chunks(chunks: Sequence[np.ndarray], split: ChunkSplit) -> np.ndarray:
    """Reassemble TotalSegmentator's three overlapping z chunks."""
    t, m = split.third, split.margin
    first, middle, last = chunks
    depth = first.shape[2] - m + (middle.shape[2] - 2 * m + 1) + (last.shape[2] - m + 1)
    out = np.zeros((*first.shape[:2], depth), dtype=np.uint8)
    out[:, :, :t] = first[:, :, :-m]
    out[:, :, t : 2 * t] = middle[:, :, m - 1 : -m]
    out[:, :, 2 * t :] = last[:, :, m - 1 :]
    return out


def model_grid_postprocess(
    labels: np.ndarray,
    run: ModelRun,
    auxiliary: Sequence[int],
    zooms: tuple[float, float, float],
    small_blobs_mm3: float | None,
) -> np.ndarray:
    """Task rules applied at model resolution (in place on ``labels``)."""
    voxel_mm3 = float(np.prod(zooms))
    if auxiliary:
        labels[np.isin(labels, list(auxiliary))] = 0
    if run.rules == "body":
        ids = {name: idx for idx, name in run.classes.items()}
        keep_largest_blob(labels, ids["body_trunc"])
        remove_small_blobs(labels, [ids["body_extremities"]], BODY_EXTREMITIES_MIN_MM3 / voxel_mm3)
    if run.rules == "vertebrae_pp":
        from raytseg.pipeline.vertebrae import postprocess_vertebrae_pp

        labels[...] = postprocess_vertebrae_pp(labels, run.classes, voxel_mm3, zooms)
    if small_blobs_mm3 is not None:
        remove_small_blobs(labels, list(run.classes), small_blobs_mm3 / voxel_mm3)
    return labels


def to_input_grid(
    labels: np.ndarray, inverse: InverseRecord, device: torch.device | None = None, *, ops: FinalOps = _NO_OPS
) -> nib.Nifti1Image:
    """Resample back (order 0; ``ops.one_hot_upsampling``: ``upsample_one_hot``; not at all with
    ``ops.model_grid``), undo reorientation and crop: TotalSegmentator's order.

    ``device``: where to resample (see ``preprocess``); None uses scipy on the CPU.
    """
    img = nib.Nifti1Image(labels, inverse.model_affine)
    if inverse.resampled and labels.shape != inverse.canonical_shape and not ops.model_grid:
        if ops.one_hot_upsampling:
            back = upsample_one_hot(labels, inverse.canonical_shape)
        else:
            zoom = np.array(inverse.canonical_shape) / np.array(labels.shape)
            back = resample(labels, zoom.tolist(), 0, device)
        img = nib.Nifti1Image(back, inverse.canonical_affine)
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    to_original = ornt_transform(axcodes2ornt("RAS"), io_orientation(inverse.original_affine))
    img = img.as_reoriented(to_original)
    if inverse.crop_box is not None:
        full = np.zeros(inverse.original_shape, dtype=np.uint8)
        (x0, x1), (y0, y1), (z0, z1) = inverse.crop_box
        full[x0:x1, y0:y1, z0:z1] = np.asanyarray(img.dataobj)
        img = nib.Nifti1Image(full, inverse.original_affine)
    return img


def upsample_one_hot(labels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """TotalSegmentator's smooth upsampling (``--higher_order_resampling_LEGACY``, its
    ``resample_one_hot_crop`` at order 1): each class's mask, cropped to its box plus a margin,
    interpolated linearly on the coordinates a whole-volume resize would use, kept where it
    is at least 0.5; a higher label wins where masks overlap. The boxes come from one
    ``find_objects`` pass (TotalSegmentator scans the whole volume once per class)."""
    from scipy import ndimage

    old, new = np.array(labels.shape), np.array(shape)
    scale = new / old
    out = np.zeros(shape, dtype=np.uint8)
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        lo = np.maximum([s.start - _ONE_HOT_MARGIN for s in box], 0)
        hi = np.minimum([s.stop + _ONE_HOT_MARGIN for s in box], old)
        to_lo = np.maximum(np.floor(lo * scale).astype(int), 0)
        to_hi = np.minimum(np.ceil(hi * scale).astype(int), new)
        if np.any(to_hi <= to_lo):
            continue
        mask = (labels[tuple(map(slice, lo, hi))] == label).astype(np.float32)
        axes = zip(to_lo, to_hi, old, new, lo, strict=True)  # target range, m -> n voxels, crop start
        coords = [(np.arange(a, b) + 0.5) * m / n - 0.5 - start for a, b, m, n, start in axes]
        grid = np.array(np.meshgrid(*coords, indexing="ij"))
        inside = ndimage.map_coordinates(mask, grid, order=1, mode="nearest") >= 0.5
        out[tuple(map(slice, to_lo, to_hi))][inside] = label
    return out


def final_labels(img: nib.Nifti1Image, run: ModelRun, ops: FinalOps, zooms: Sequence[float]) -> np.ndarray:
    """Label operations on the input grid (binarise, refine, roi filter, remove outside)."""
    data = np.asarray(img.dataobj, dtype=np.uint8)
    data = np.array(data, copy=True)
    if run.binarize:
        data = (data > 0).astype(np.uint8)
    if ops.refine_inside is not None:
        from raytseg.pipeline.vertebrae import dilate_labels

        data = dilate_labels(data, run.classes, zooms, ops.refine_dilation_mm)
        data[~ops.refine_inside] = 0
    if ops.roi_ids is not None:
        data[~np.isin(data, ops.roi_ids)] = 0
    if ops.keep_inside is not None:
        from scipy.ndimage import binary_dilation

        iterations = max(1, int(ops.keep_inside_dilation_mm / float(np.mean(zooms))))
        data[~binary_dilation(ops.keep_inside, iterations=iterations)] = 0
    return data


def postprocess(
    outputs: Sequence[NetworkOutput],
    inverse: InverseRecord,
    run: ModelRun,
    ops: FinalOps,
    *,
    auxiliary: Sequence[int] = (),
    device: torch.device | None = None,
) -> tuple[Segmentation, np.ndarray]:
    """Full postprocess; also returns the model-grid labels (for --fast statistics)."""
    labels = merge_outputs(outputs, run, inverse.split)
    labels = model_grid_postprocess(labels, run, auxiliary, inverse.model_zooms, ops.remove_small_blobs_mm3)
    upsampled = labels
    if ops.one_hot_upsampling and ops.roi_ids is not None:  # as TotalSegmentator: other classes
        upsampled = np.where(np.isin(labels, ops.roi_ids), labels, 0)  # go before, not after
    img = to_input_grid(upsampled, inverse, device, ops=ops)
    # -sl: the model grid's header, as TotalSegmentator copies its prediction's
    header = (img.header if ops.model_grid else inverse.original_header).copy()
    header.set_data_dtype(np.uint8)
    data = final_labels(img, run, ops, inverse.original_header.get_zooms()[:3])
    seg = Segmentation(labels=data, affine=img.affine, header=header, label_map={}, task=run.task)
    return seg, labels


def renumber(seg: Segmentation, renumbering: Renumbering | None) -> Segmentation:
    """``seg`` in ``renumbering``'s numbering (classes it lacks become 0); as is for None.

    TotalSegmentator renumbers before its roi_subset filter and remove-outside step; both
    only zero whole classes, so renumbering after them gives the same voxels.
    """
    if renumbering is None:
        return seg
    table = np.zeros(256, dtype=np.uint8)
    for current, v1 in renumbering.ids.items():
        table[current] = v1
    return replace(seg, labels=table[seg.labels], label_map=dict(renumbering.classes))


def keep_largest_blob(labels: np.ndarray, label: int) -> None:
    """Keep only the largest connected component of ``label`` (in place)."""
    from scipy import ndimage

    roi = labels == label
    blobs, count = ndimage.label(roi)
    if count == 0:
        return
    sizes = np.bincount(blobs.ravel())[1:]
    labels[roi & (blobs != int(np.argmax(sizes)) + 1)] = 0


def remove_small_blobs(labels: np.ndarray, label_ids: Sequence[int], min_voxels: float) -> None:
    """Remove components with at most ``min_voxels`` voxels from each label (in place)."""
    from scipy import ndimage

    for label in label_ids:
        roi = labels == label
        blobs, count = ndimage.label(roi)
        if count == 0:
            continue
        sizes = np.bincount(blobs.ravel())
        small = np.flatnonzero(sizes <= min_voxels)
        small = small[small != 0]
        labels[np.isin(blobs, small)] = 0
