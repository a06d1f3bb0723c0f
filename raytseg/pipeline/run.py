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

from raytseg.config import Settings
from raytseg.options import split_options
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.passes import Region, after_pass, finish, prepare
from raytseg.pipeline.plan import Pass, admit
from raytseg.pipeline.preprocess import ModelPlans, PlansCache, model_key
from raytseg.pipeline.records import OutputOptions, Segmentation, SegmentOptions, Volume
from raytseg.tasks import ModelSpec
from raytseg.weights.synth import warn_if_synthetic

if TYPE_CHECKING:
    import torch

    from raytseg.pipeline.model import Network
    from raytseg.weights.store import WeightsStore

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


NetworkLoader = Callable[[ModelSpec, ModelPlans], "Network"]


class Segmenter:
    """Runs requests through plan -> preprocess -> model -> postprocess in this process.

    ``load_network`` builds a model's network; by default nnU-Net's from the store's
    checkpoints on ``device`` (tests of what surrounds the network pass a fake).
    """

    def __init__(
        self,
        store: WeightsStore,
        device: torch.device,
        *,
        progress: Progress | None = None,
        load_network: NetworkLoader | None = None,
    ) -> None:
        self.store = store
        self.device = device
        self._models: dict[str, Network] = {}
        self._plans = PlansCache(store)
        self._lock = threading.Lock()
        self._progress = progress or (lambda message: log.info(message))
        self._load_network = load_network or self._load_from_store

    def segment(self, volume: Volume, options: SegmentOptions) -> Segmentation:
        """Segment one loaded image; raises errors from ``raytseg.errors``."""
        admitted = admit(options, self.store.settings, modality=volume.modality)
        if admitted.options.task != options.task:
            self._progress(f"The image is {volume.modality}: running task {admitted.options.task}.")
        warn_if_synthetic(admitted.plan.all_models, self.store)
        started = time.perf_counter()
        seg = self._run(volume, admitted.passes)
        seg.timings["total"] = time.perf_counter() - started
        return seg

    def model(self, spec: ModelSpec) -> Network:
        """The resident network for ``spec`` (loaded on first use)."""
        key = model_key(spec)
        with self._lock:
            if key not in self._models:
                self._progress(f"Loading model {key}")
                self._models[key] = self._load_network(spec, self.plans(spec))
            return self._models[key]

    def _load_from_store(self, spec: ModelSpec, plans: ModelPlans) -> Network:
        from raytseg.pipeline.model import LoadedModel, ModelFiles

        files = ModelFiles(plans, tuple(self.store.checkpoint_paths(spec)))
        return LoadedModel.load(files, self.device)

    def plans(self, spec: ModelSpec) -> ModelPlans:
        """The model's plans (read once)."""
        return self._plans(spec)

    def _run(self, volume: Volume, passes: tuple[Pass, ...]) -> Segmentation:
        timings: dict[str, float] = {}
        region = None
        for index, step in enumerate(passes):
            if not step.is_main:
                self._progress(f"Finding the region with {step.plan.main.task}")
            seg = self._pass(volume, step, region, timings)
            following = after_pass(volume, passes, index, seg)
            if isinstance(following, Segmentation):
                if following is not seg:
                    self._progress("The crop region is empty; returning an empty segmentation.")
                following.timings.update(timings)
                return following
            region = following
        raise AssertionError("the main pass always ends the run")

    def _pass(
        self, volume: Volume, step: Pass, region: Region | None, timings: dict[str, float]
    ) -> Segmentation:
        specs = step.plan.main.models
        models = {model_key(spec): self.model(spec) for spec in specs}
        plans = {model_key(spec): self.plans(spec) for spec in specs}
        with _timed(timings, "preprocess"):
            prepared = prepare(volume, step, plans, region, device=self._resample_device)
        with _timed(timings, "model"):
            outputs = []
            for item in prepared.inputs:
                self._progress(f"Predicting with {item.model_key}")
                outputs.append(models[item.model_key].predict(item))
        with _timed(timings, "postprocess"):
            return finish(volume, step, prepared, outputs, region, device=self._resample_device)

    @property
    def _resample_device(self) -> torch.device | None:
        """Resample on the GPU beside the networks (same voxels as scipy, see ``zoom``)."""
        return self.device if self.device.type == "cuda" else None


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


def segment(
    input: str | os.PathLike[str] | nib.Nifti1Image,  # noqa: A002 - TotalSegmentator's name
    output: str | os.PathLike[str] | None = None,
    task: str = "total",
    *,
    device: str = "gpu",
    **options: Any,
) -> nib.Nifti1Image | tuple[nib.Nifti1Image, dict[str, Any]]:
    """Segment an image like ``totalsegmentator.python_api.totalsegmentator``.

    ``input``: a NIfTI path, DICOM folder or zip, fsspec or DICOMweb URI, or a nibabel
    image. ``output``: a folder, or a ``.nii.gz`` file with ``ml=True``; None writes nothing
    (with ``dicomweb_store``, only the DICOM outputs are stored). ``options``: the fields of
    ``SegmentOptions`` and ``OutputOptions``, ``no_derived_masks=True`` and ``report=PATH``
    (the run report) as TotalSegmentator's. Returns the multilabel image (label table in its
    header extension), with the statistics dict when ``statistics=True``.
    """
    from raytseg import storage
    from raytseg.pipeline.export import check_output, write_segmentation
    from raytseg.pipeline.report import ReportedRun, device_name, report_json

    started, settings = time.perf_counter(), Settings.from_env()
    opts, out, report = _api_options(task, options)
    volume = load_volume(input, LoadLimits.from_settings(settings))
    check_output(out, volume)
    segmenter = default_segmenter(device, settings)
    seg = segmenter.segment(volume, opts)
    target = None if output is None else str(output)
    written = write_segmentation(seg, volume, target, out) if target or out.dicomweb_store else []
    if report is not None:
        source = "Nifti1Image" if isinstance(input, nib.Nifti1Image) else str(input)
        runtime_s, device_used = time.perf_counter() - started, device_name(segmenter.device)
        run = ReportedRun.of(
            seg, (source, target), opts, files=out, device=device_used, written=written, runtime_s=runtime_s
        )
        storage.write_bytes(report, report_json(run))
    img = seg.to_nifti()
    return (img, seg.statistics or {}) if opts.statistics else img


def _api_options(task: str, options: dict[str, Any]) -> tuple[SegmentOptions, OutputOptions, str | None]:
    """The records of the Python API's keywords, TotalSegmentator's spellings included
    (``no_derived_masks``), and the run report's path (``report``)."""
    if "no_derived_masks" in options:
        options["derived_masks"] = not options.pop("no_derived_masks")
    report = options.pop("report", None)
    opts, out = split_options({"task": task, **options})
    return opts, out, None if report is None else str(report)
