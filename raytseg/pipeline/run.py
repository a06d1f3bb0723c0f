"""The whole pipeline in one process: the reference path the service and batch must match.

``Segmenter`` keeps every network it has loaded, so a script or a worker that segments
many images loads each model once (TotalSegmentator reloads them for every image).
``segment()`` is the TotalSegmentator-style Python API on top of it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from raytseg.config import Settings
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.plan import CropPass, RunPlan, plan_run
from raytseg.pipeline.postprocess import FinalOps, postprocess
from raytseg.pipeline.preprocess import ModelPlans, crop_box_from_mask, model_key, preprocess
from raytseg.pipeline.records import Box, NetworkOutput, Prepared, Segmentation, SegmentOptions, Volume
from raytseg.pipeline.stats import basic_statistics
from raytseg.tasks import ModelSpec, get_task

if TYPE_CHECKING:
    import torch

    from raytseg.pipeline.model import LoadedModel
    from raytseg.weights.store import WeightsStore

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


class Segmenter:
    """Runs requests through plan -> preprocess -> model -> postprocess in this process."""

    def __init__(
        self, store: WeightsStore, device: torch.device, *, progress: Progress | None = None
    ) -> None:
        self.store = store
        self.device = device
        self._models: dict[str, LoadedModel] = {}
        self._plans: dict[str, ModelPlans] = {}
        self._lock = threading.Lock()
        self._progress = progress or (lambda message: log.info(message))

    def segment(self, volume: Volume, options: SegmentOptions) -> Segmentation:
        """Segment one loaded image; raises errors from ``raytseg.errors``."""
        task = get_task(options.task)
        if task.license_required:
            from raytseg.weights.license import require_license

            require_license(task, self.store.settings)
        plan = plan_run(options)
        self._warn_if_synthetic(plan)
        started = time.perf_counter()
        seg = self._run(volume, plan, options)
        seg.timings["total"] = time.perf_counter() - started
        return seg

    def model(self, spec: ModelSpec) -> LoadedModel:
        """The resident network for ``spec`` (loaded on first use)."""
        from raytseg.pipeline.model import LoadedModel, ModelFiles

        key = model_key(spec)
        with self._lock:
            if key not in self._models:
                self._progress(f"Loading model {key}")
                files = ModelFiles(self.plans(spec), tuple(self.store.checkpoint_paths(spec)))
                self._models[key] = LoadedModel.load(files, self.device)
            return self._models[key]

    def plans(self, spec: ModelSpec) -> ModelPlans:
        key = model_key(spec)
        if key not in self._plans:
            plans, dataset_json = self.store.read_plans(spec)
            self._plans[key] = ModelPlans(key, spec.configuration, plans, dataset_json)
        return self._plans[key]

    def _run(self, volume: Volume, plan: RunPlan, options: SegmentOptions) -> Segmentation:
        region = None
        if plan.crop is not None:
            self._progress(f"Finding the region with {plan.crop.plan.main.task}")
            found = self._run(volume, plan.crop.plan, crop_pass_options(plan.crop))
            region = find_region(volume, plan.crop, found)
            if region is None:
                self._progress("The crop region is empty; returning an empty segmentation.")
                return empty_segmentation(volume, plan, options)
        models = {model_key(spec): self.model(spec) for spec in plan.main.models}
        plans = {key: self.plans(spec) for key, spec in zip(models, plan.main.models, strict=True)}
        timings: dict[str, float] = {}
        with _timed(timings, "preprocess"):
            prepared = prepare(volume, plan, plans, region, device=self._resample_device)
        with _timed(timings, "model"):
            outputs = []
            for item in prepared.inputs:
                self._progress(f"Predicting with {item.model_key}")
                outputs.append(models[item.model_key].predict(item))
        with _timed(timings, "postprocess"):
            seg = finish(volume, plan, options, prepared, outputs, region, device=self._resample_device)
        seg.timings.update(timings)
        return seg

    @property
    def _resample_device(self) -> torch.device | None:
        """Resample on the GPU beside the networks (same voxels as scipy, see ``zoom``)."""
        return self.device if self.device.type == "cuda" else None

    def _warn_if_synthetic(self, plan: RunPlan) -> None:
        from raytseg.weights.synth import is_synthetic

        for spec in plan.all_models:
            try:
                synthetic = is_synthetic(self.store.model_folder(spec))
            except Exception:  # a missing model is reported when it is loaded
                return
            if synthetic:
                log.warning(
                    "Model %s has synthetic random weights: its output is meaningless, not a segmentation.",
                    model_key(spec),
                )
                return


@dataclass(frozen=True)
class Region:
    """Where the crop pass found the task's region, on the input grid."""

    box: Box
    keep_inside: np.ndarray | None = None  # remove labels outside this mask ...
    keep_inside_dilation_mm: float = 0.0  # ... dilated by this much


def crop_pass_options(crop: CropPass) -> SegmentOptions:
    """Options of the crop pass itself: a plain multilabel run of the crop task."""
    return SegmentOptions(task=crop.plan.main.task)


def find_region(volume: Volume, crop: CropPass, found: Segmentation) -> Region | None:
    """Bounding box (plus margin) of the crop rois in the crop pass output; None if empty."""
    by_name = {name: idx for idx, name in found.label_map.items()}
    rois = found.label_map if crop.rois is None else [by_name[r] for r in crop.rois]
    mask = np.isin(found.labels, list(rois))
    if not mask.any():
        return None
    box = crop_box_from_mask(mask, crop.margin_mm, volume.affine)
    if crop.remove_outside is None:
        return Region(box)
    names, dilation_mm = crop.remove_outside
    return Region(box, np.isin(found.labels, [by_name[r] for r in names]), dilation_mm)


def prepare(
    volume: Volume,
    plan: RunPlan,
    plans: Mapping[str, ModelPlans],
    region: Region | None,
    *,
    device: torch.device | None = None,
) -> Prepared:
    """The step before the networks: crop to the region, resample (on ``device`` if given), normalise."""
    return preprocess(
        volume,
        plan.main,
        plans,
        crop_box=None if region is None else region.box,
        keep_model_image=plan.fast_statistics,
        device=device,
    )


def finish(  # noqa: PLR0913 - the records of one request, plus where to resample
    volume: Volume,
    plan: RunPlan,
    options: SegmentOptions,
    prepared: Prepared,
    outputs: Sequence[NetworkOutput],
    region: Region | None,
    *,
    device: torch.device | None = None,
) -> Segmentation:
    """The step after the networks: back to the input grid (resampled on ``device`` if given),
    label rules, statistics."""
    ops = FinalOps(
        roi_ids=plan.roi_ids,
        keep_inside=None if region is None else region.keep_inside,
        keep_inside_dilation_mm=plan.crop.remove_outside[1]
        if plan.crop and plan.crop.remove_outside
        else 0.0,
        remove_small_blobs_mm3=options.remove_small_blobs,
    )
    aux = list(get_task(plan.main.task).auxiliary)
    seg, model_labels = postprocess(outputs, prepared.inverse, plan.main, ops, auxiliary=aux, device=device)
    model_grid = (model_labels, prepared.model_image, prepared.inverse.model_zooms)
    return Segmentation(
        labels=seg.labels,
        affine=seg.affine,
        header=seg.header,
        label_map=dict(plan.output_classes),
        task=plan.main.task,
        statistics=_statistics(volume, seg, plan, options, model_grid),
    )


def empty_segmentation(volume: Volume, plan: RunPlan, options: SegmentOptions) -> Segmentation:
    """What TotalSegmentator returns when the crop region is empty: all zeros."""
    header = volume.header.copy()
    header.set_data_dtype(np.uint8)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    stats = None
    if options.statistics:
        stats = basic_statistics(labels, volume.data, volume.zooms, dict(plan.output_classes))
    return Segmentation(labels, volume.affine, header, dict(plan.output_classes), plan.main.task, stats)


ModelGrid = tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]


def _statistics(
    volume: Volume, seg: Segmentation, plan: RunPlan, options: SegmentOptions, model_grid: ModelGrid
) -> dict[str, dict[str, Any]] | None:
    if not options.statistics:
        return None
    classes = dict(plan.output_classes)
    include, aggregation = options.stats_include_incomplete, options.stats_aggregation
    labels, image, zooms = model_grid
    if plan.fast_statistics and image is not None:
        # As TotalSegmentator: --fast statistics use the model grid (10x faster, same volumes).
        return basic_statistics(
            labels, image, zooms, classes, include_incomplete=include, aggregation=aggregation
        )
    return basic_statistics(
        seg.labels, volume.data, volume.zooms, classes, include_incomplete=include, aggregation=aggregation
    )


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


_SEGMENTERS: dict[tuple[str, str], Segmenter] = {}
_SEGMENTERS_LOCK = threading.Lock()


def default_segmenter(device: str = "gpu", settings: Settings | None = None) -> Segmenter:
    """A process-wide Segmenter per (weights folder, device): models stay loaded between calls."""
    from raytseg.pipeline.model import select_device
    from raytseg.weights.store import WeightsStore

    settings = settings or Settings.from_env()
    torch_device = select_device(device)
    key = (str(settings.weights_uri or settings.weights_dir), str(torch_device))
    with _SEGMENTERS_LOCK:
        if key not in _SEGMENTERS:
            _SEGMENTERS[key] = Segmenter(WeightsStore(settings), torch_device)
        return _SEGMENTERS[key]


def segment(  # noqa: PLR0913 - mirrors totalsegmentator.python_api.totalsegmentator
    input: str | os.PathLike[str] | nib.Nifti1Image,  # noqa: A002 - TotalSegmentator's name
    output: str | os.PathLike[str] | None = None,
    task: str = "total",
    *,
    ml: bool = False,
    device: str = "gpu",
    preview: bool = False,
    no_derived_masks: bool = False,
    **options: Any,
) -> nib.Nifti1Image | tuple[nib.Nifti1Image, dict[str, Any]]:
    """Segment an image like ``totalsegmentator.python_api.totalsegmentator``.

    Args:
        input: NIfTI path, DICOM folder or zip, fsspec URI, or a nibabel image.
        output: where to write results (a folder, or a ``.nii.gz`` file with ``ml=True``);
            None writes nothing.
        task: TotalSegmentator task name.
        ml: write one multilabel file instead of one file per class.
        device: ``cpu``, ``gpu``, ``gpu:N`` or ``mps``.
        preview: also write ``preview_<task>.png`` (a 2D overview).
        no_derived_masks: skip body.nii.gz / skin.nii.gz for task ``body``.
        **options: ``fast``, ``fastest``, ``roi_subset``, ``statistics``, ``body_seg``,
            ``force_split``, ``robust_crop``, ``remove_small_blobs``,
            ``stats_include_incomplete``, ``stats_aggregation`` (see ``SegmentOptions``).

    Returns:
        The multilabel image with the label table in its header extension, and the
        statistics dict as well when ``statistics=True`` (as TotalSegmentator does).

    Example:
        >>> import raytseg
        >>> img = raytseg.segment("ct.nii.gz", "segmentations", fast=True)  # doctest: +SKIP
    """
    from raytseg.pipeline.export import write_segmentation

    settings = Settings.from_env()
    opts = SegmentOptions(task=task, **options)
    volume = load_volume(input, LoadLimits.from_settings(settings))
    seg = default_segmenter(device, settings).segment(volume, opts)
    if output is not None:
        extra = extra_outputs(seg, volume, ml=ml, derived_masks=not no_derived_masks, preview=preview)
        write_segmentation(seg, str(output), ml=ml, extra_files=extra)
    img = seg.to_nifti()
    return (img, seg.statistics or {}) if opts.statistics else img


def extra_outputs(
    seg: Segmentation, volume: Volume, *, ml: bool, derived_masks: bool = True, preview: bool = False
) -> dict[str, bytes]:
    """Files written beside the masks: body/skin for ``body`` (per-class only), the preview."""
    files: dict[str, bytes] = {}
    if derived_masks and not ml and seg.task == "body":
        from raytseg.pipeline.export import derived_body_masks

        files.update(derived_body_masks(seg, volume))
    if preview:
        from raytseg.pipeline.preview import preview_png

        files[f"preview_{seg.task}.png"] = preview_png(seg, volume)
    return files
