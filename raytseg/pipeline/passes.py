"""One pass over the image, and what follows it: the steps every entry point runs.

For each ``Pass`` of ``plan.passes()``, in order::

    prepare ──Prepared──▶ (model stage) ──NetworkOutput×n──▶ finish ──Segmentation──▶ after_pass
                                                                                         │
        next pass's Region ◀── crop pass, region found ─────────────────────────────────┤
        the request's Segmentation ◀── main pass; or crop region empty (all zeros) ─────┘

``raytseg.pipeline.run.Segmenter`` runs the loop in one process, the service spreads it
over replicas and the batch job over Ray Data steps; none of them decides what comes next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from raytseg.pipeline.plan import CropPass, Pass, Refinement
from raytseg.pipeline.postprocess import FinalOps, postprocess, renumber
from raytseg.pipeline.preprocess import ModelPlans, Resampling, crop_box_from_mask, preprocess
from raytseg.pipeline.records import (
    Box,
    NetworkOutput,
    Prepared,
    Probabilities,
    Segmentation,
    SegmentOptions,
    Volume,
)
from raytseg.pipeline.stats import basic_statistics
from raytseg.tasks import get_task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Region:
    """Where a crop pass found the next pass's region, on the input grid."""

    box: Box | None  # None: the whole image (a refining pass)
    keep_inside: np.ndarray | None = None  # remove labels outside this mask ...
    keep_inside_dilation_mm: float = 0.0  # ... dilated by this much
    refine_inside: np.ndarray | None = None  # keep labels, dilated by ..., inside this mask
    refine_dilation_mm: float = 0.0
    found_by: dict[str, str] = field(default_factory=dict)  # the crop pass's backends, by model


def prepare(
    volume: Volume,
    step: Pass,
    plans: Mapping[str, ModelPlans],
    region: Region | None,
    *,
    device: torch.device | None = None,
) -> Prepared:
    """The step before the networks: crop to the region, resample (on ``device`` if given), normalise."""
    return preprocess(
        volume,
        step.plan.main,
        plans,
        crop_box=None if region is None else region.box,
        keep_model_image=step.plan.fast_statistics,
        resampling=Resampling(step.options.resampling_order, device),
    )


def finish(  # noqa: PLR0913 - the records of one pass, plus where to resample
    volume: Volume,
    step: Pass,
    prepared: Prepared,
    outputs: Sequence[NetworkOutput],
    region: Region | None,
    *,
    device: torch.device | None = None,
) -> Segmentation:
    """The step after the networks: back to the input grid (resampled on ``device`` if given),
    label rules, statistics."""
    plan = step.plan
    region = region or Region(None)
    ops = FinalOps(
        roi_ids=plan.roi_ids,
        keep_inside=region.keep_inside,
        keep_inside_dilation_mm=region.keep_inside_dilation_mm,
        refine_inside=region.refine_inside,
        refine_dilation_mm=region.refine_dilation_mm,
        remove_small_blobs_mm3=step.options.remove_small_blobs,
        one_hot_upsampling=step.options.higher_order_resampling_LEGACY,
        model_grid=step.options.save_lowres,
    )
    aux = list(get_task(plan.main.task).auxiliary)
    seg, model_labels = postprocess(outputs, prepared.inverse, plan.main, ops, auxiliary=aux, device=device)
    model_grid = (model_labels, prepared.model_image, prepared.inverse.model_zooms)
    answer = Segmentation(
        labels=seg.labels,
        affine=seg.affine,
        header=seg.header,
        label_map=dict(plan.output_classes),
        task=plan.main.task,
        statistics=_statistics(volume, seg, step, model_grid),
        probabilities=_kept_probabilities(outputs, prepared),
        backends={**region.found_by, **{out.model_key: out.backend for out in outputs}},
    )
    return renumber(answer, plan.renumbering)


def _kept_probabilities(outputs: Sequence[NetworkOutput], prepared: Prepared) -> Probabilities | None:
    """The one network output that kept its probabilities (-sp), with nnU-Net's properties
    of its input: what NibabelIOWithReorient read from the model-grid image (canonical, so
    both affines are its affine) and what the preprocessor added."""
    for out in outputs:
        if out.probabilities is None:
            continue
        item = next(i for i in prepared.inputs if (i.model_key, i.chunk) == (out.model_key, out.chunk))
        affine = prepared.inverse.model_affine
        properties = {
            "nibabel_stuff": {"original_affine": affine, "reoriented_affine": affine},
            **item.geometry.as_nnunet_properties(),
        }
        properties["spacing"] = [float(zoom) for zoom in prepared.inverse.model_zooms[::-1]]  # the header's
        return Probabilities(out.probabilities, properties)
    return None


def after_pass(
    volume: Volume, passes: Sequence[Pass], index: int, seg: Segmentation
) -> Region | Segmentation:
    """What follows pass ``index``: the next pass's region, or the request's segmentation.

    The main pass's segmentation is the answer. A crop pass gives the region of the pass
    it feeds; when that region is empty, the answer is all zeros, as TotalSegmentator's.
    """
    step = passes[index]
    if step.feeds is None:
        return seg
    region = find_region(volume, step.feeds, seg)
    if region is None:
        return replace(empty_segmentation(volume, passes[-1]), backends=seg.backends)
    return replace(region, found_by=seg.backends)


def find_region(volume: Volume, crop: CropPass, found: Segmentation) -> Region | None:
    """Bounding box (plus margin) of the crop rois in the crop pass output, or for a refining
    pass their mask; None if empty."""
    by_name = {name: idx for idx, name in found.label_map.items()}
    rois = found.label_map if crop.rois is None else [by_name[r] for r in crop.rois]
    mask = np.isin(found.labels, list(rois))
    if not mask.any():
        return None
    if isinstance(crop.then, Refinement):
        return Region(None, refine_inside=mask, refine_dilation_mm=crop.then.dilation_mm)
    box = crop_box_from_mask(mask, crop.then, volume.affine)
    if crop.remove_outside is None:
        return Region(box)
    names, dilation_mm = crop.remove_outside
    return Region(box, np.isin(found.labels, [by_name[r] for r in names]), dilation_mm)


def empty_segmentation(volume: Volume, main: Pass) -> Segmentation:
    """What TotalSegmentator returns when the crop region is empty: all zeros."""
    plan, options = main.plan, main.options
    header = volume.header.copy()
    header.set_data_dtype(np.uint8)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    stats = None
    if options.statistics:
        stats = _measure(labels, volume.data, volume.zooms, main)
    empty = Segmentation(labels, volume.affine, header, dict(plan.output_classes), plan.main.task, stats)
    return renumber(empty, plan.renumbering)


ModelGrid = tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]


def _statistics(
    volume: Volume, seg: Segmentation, step: Pass, model_grid: ModelGrid
) -> dict[str, dict[str, Any]] | None:
    if not step.options.statistics:
        return None
    labels, image, zooms = model_grid
    if step.plan.fast_statistics and image is not None:
        # As TotalSegmentator: --fast statistics use the model grid (10x faster, same volumes).
        return _measure(labels, image, zooms, step)
    return _measure(seg.labels, volume.data, volume.zooms, step)


def _measure(
    labels: np.ndarray, image: np.ndarray, zooms: tuple[float, float, float], step: Pass
) -> dict[str, dict[str, Any]]:
    options: SegmentOptions = step.options
    return basic_statistics(
        labels,
        image,
        zooms,
        dict(step.plan.output_classes),
        include_incomplete=options.stats_include_incomplete,
        aggregation=options.stats_aggregation,
        # TotalSegmentator's --fast statistics (nnunet.py) do not pass statistics_extra on.
        extra=options.statistics_extra and not step.plan.fast_statistics,
        normalized=options.statistics_normalized_intensities,
    )
