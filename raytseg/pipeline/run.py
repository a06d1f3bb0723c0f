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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from raytseg.config import Settings
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.plan import CropPass, RunPlan, plan_run
from raytseg.pipeline.postprocess import FinalOps, postprocess
from raytseg.pipeline.preprocess import ModelPlans, crop_box_from_mask, model_key, preprocess
from raytseg.pipeline.records import Box, Segmentation, SegmentOptions, Volume
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
        crop_box, ops = (
            None,
            FinalOps(roi_ids=plan.roi_ids, remove_small_blobs_mm3=options.remove_small_blobs),
        )
        if plan.crop is not None:
            region = self._region(volume, plan.crop)
            if region is None:
                self._progress("The crop region is empty; returning an empty segmentation.")
                return _empty(volume, plan, options)
            crop_box, ops = region[0], _with_keep_inside(ops, plan.crop, region[1])
        models = {model_key(spec): self.model(spec) for spec in plan.main.models}
        plans = {key: self.plans(spec) for key, spec in zip(models, plan.main.models, strict=True)}
        timings: dict[str, float] = {}
        with _timed(timings, "preprocess"):
            prepared = preprocess(
                volume, plan.main, plans, crop_box=crop_box, keep_model_image=plan.fast_statistics
            )
        with _timed(timings, "model"):
            outputs = []
            for item in prepared.inputs:
                self._progress(f"Predicting with {item.model_key}")
                outputs.append(models[item.model_key].predict(item))
        with _timed(timings, "postprocess"):
            aux = list(get_task(plan.main.task).auxiliary)
            seg, model_labels = postprocess(outputs, prepared.inverse, plan.main, ops, auxiliary=aux)
        model_grid = (model_labels, prepared.model_image, prepared.inverse.model_zooms)
        return Segmentation(
            labels=seg.labels,
            affine=seg.affine,
            header=seg.header,
            label_map=dict(plan.output_classes),
            task=plan.main.task,
            statistics=_statistics(volume, seg, plan, options, model_grid),
            timings=timings,
        )

    def _region(self, volume: Volume, crop: CropPass) -> tuple[Box, np.ndarray | None] | None:
        """Run the crop pass; (bounding box, keep-inside mask) or None when empty."""
        self._progress(f"Finding the region with {crop.plan.main.task}")
        found = self._run(volume, crop.plan, SegmentOptions(task=crop.plan.main.task))
        inverse_map = {name: idx for idx, name in found.label_map.items()}
        if crop.rois is None:
            mask = found.labels > 0
        else:
            mask = np.isin(found.labels, [inverse_map[r] for r in crop.rois])
        if not mask.any():
            return None
        keep = None
        if crop.remove_outside is not None:
            keep = np.isin(found.labels, [inverse_map[r] for r in crop.remove_outside[0]])
        return crop_box_from_mask(mask, crop.margin_mm, volume.affine), keep

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


def _with_keep_inside(ops: FinalOps, crop: CropPass, keep: np.ndarray | None) -> FinalOps:
    if keep is None or crop.remove_outside is None:
        return ops
    return FinalOps(
        roi_ids=ops.roi_ids,
        keep_inside=keep,
        keep_inside_dilation_mm=crop.remove_outside[1],
        remove_small_blobs_mm3=ops.remove_small_blobs_mm3,
    )


def _empty(volume: Volume, plan: RunPlan, options: SegmentOptions) -> Segmentation:
    header = volume.header.copy()
    header.set_data_dtype(np.uint8)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    stats = None
    if options.statistics:
        stats = basic_statistics(labels, volume.data, volume.zooms, dict(plan.output_classes))
    return Segmentation(labels, volume.affine, header, dict(plan.output_classes), plan.main.task, stats)


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
