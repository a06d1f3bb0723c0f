"""The whole pipeline in one process: the reference path the service and batch must match.

``Segmenter`` keeps every network it has loaded, so a script or a worker that segments
many images loads each model once (TotalSegmentator reloads them for every image).
``segment()`` is the TotalSegmentator-style Python API on top of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nibabel as nib

from raytseg.config import Settings
from raytseg.options import placed_files, split_options
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.modality import admit_image
from raytseg.pipeline.passes import Region, after_pass, finish, prepare
from raytseg.pipeline.plan import Pass
from raytseg.pipeline.preprocess import ModelPlans, PlansCache, model_key
from raytseg.pipeline.records import OutputOptions, Segmentation, SegmentOptions, Volume
from raytseg.tasks import ModelSpec
from raytseg.weights.synth import warn_if_synthetic

if TYPE_CHECKING:
    import torch

    from raytseg.pipeline.model import Network
    from raytseg.pipeline.report import ReportedRun
    from raytseg.weights.store import WeightsStore

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


NetworkLoader = Callable[[ModelSpec, ModelPlans], "Network"]


class Segmenter:
    """Runs requests through plan -> preprocess -> model -> postprocess in this process.

    ``load_network`` builds a model's network; by default nnU-Net's from the store's
    checkpoints on ``device``, run by ``backend`` (tests of what surrounds the network pass
    a fake).
    """

    def __init__(
        self,
        store: WeightsStore,
        device: torch.device,
        *,
        backend: str = "auto",
        progress: Progress | None = None,
        load_network: NetworkLoader | None = None,
    ) -> None:
        from raytseg.pipeline.backends import conversion_for

        self.store = store
        self.device = device
        self._conversion = conversion_for(backend, device, store.settings.cache_dir)
        self._models: dict[str, Network] = {}
        self._plans = PlansCache(store)
        self._lock = threading.Lock()
        self._progress = progress or (lambda message: log.info(message))
        self._load_network = load_network or self._load_from_store

    def segment(self, volume: Volume, options: SegmentOptions) -> Segmentation:
        """Segment one loaded image; raises errors from ``raytseg.errors``."""
        admitted, choice = admit_image(options, self.store.settings, volume, self.segment)
        if choice is not None:
            self._progress(f"Task auto: running {choice.task} ({choice.reason}).")
        elif admitted.options.task != options.task:
            self._progress(f"The image is {volume.modality}: running task {admitted.options.task}.")
        warn_if_synthetic(admitted.plan.all_models, self.store)
        started = time.perf_counter()
        seg = self._run(volume, admitted.passes)
        seg.timings["total"] = time.perf_counter() - started
        return seg if choice is None else dataclasses.replace(seg, task_choice=choice)

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
        return LoadedModel.load(files, self.device, self._conversion)

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


_SEGMENTERS: dict[tuple[str, str, str], Segmenter] = {}
_SEGMENTERS_LOCK = threading.Lock()


def default_segmenter(
    device: str = "gpu", settings: Settings | None = None, backend: str = "auto"
) -> Segmenter:
    """A process-wide Segmenter per (weights folder, device, backend that runs): models stay
    loaded between calls, also when ``auto`` and the backend it picks are both asked for."""
    from raytseg.pipeline.backends import resolve
    from raytseg.pipeline.model import select_device
    from raytseg.weights.store import WeightsStore

    settings = settings or Settings.from_env()
    torch_device = select_device(device)
    runs = resolve(backend, torch_device)
    key = (str(settings.weights_uri or settings.weights_dir), str(torch_device), runs)
    with _SEGMENTERS_LOCK:
        if key not in _SEGMENTERS:
            _SEGMENTERS[key] = Segmenter(WeightsStore(settings), torch_device, backend=runs)
        return _SEGMENTERS[key]


@dataclass(frozen=True)
class LocalRequest:
    """One image segmented in this process, as the CLI and the Python API ask for it."""

    source: str  # the input as the run report names it ("Nifti1Image" for an in-memory image)
    target: str | None  # the output folder or file (-o); None: no folder
    options: SegmentOptions
    output: OutputOptions
    places: Mapping[str, str] = field(default_factory=dict)  # files placed elsewhere (-s PATH)
    report: str | None = None  # where the run report goes (-rp)


def run_local(
    segmenter: Segmenter, volume: Volume, request: LocalRequest, started: float
) -> tuple[Segmentation, list[str]]:
    """Check the outputs, segment, write the files and the run report of ``request``; returns
    the segmentation and the locations written. ``started``: ``time.perf_counter()`` when the
    request arrived (the report's runtime)."""
    from raytseg import storage
    from raytseg.pipeline.export import check_output, write_segmentation
    from raytseg.pipeline.report import report_json

    check_output(request.output, volume)
    seg = segmenter.segment(volume, request.options)
    written = []
    if request.target is not None or request.output.dicomweb_store is not None or request.places:
        written = write_segmentation(seg, volume, request.target, request.output, request.places)
    if request.report is not None:
        run = _reported_run(segmenter, seg, request, written, time.perf_counter() - started)
        storage.write_bytes(request.report, report_json(run))
    return seg, written


def _reported_run(
    segmenter: Segmenter, seg: Segmentation, request: LocalRequest, written: list[str], runtime_s: float
) -> ReportedRun:
    from raytseg.pipeline.report import ReportedRun, device_name

    where, device = (request.source, request.target), device_name(segmenter.device)
    return ReportedRun.of(
        seg, where, request.options, files=request.output, device=device, written=written, runtime_s=runtime_s
    )


def segment(
    input: str | os.PathLike[str] | nib.Nifti1Image,  # noqa: A002 - TotalSegmentator's name
    output: str | os.PathLike[str] | None = None,
    task: str = "total",
    *,
    device: str = "gpu",
    backend: str = "auto",
    **options: Any,
) -> nib.Nifti1Image | tuple[nib.Nifti1Image, dict[str, Any]]:
    """Segment an image like ``totalsegmentator.python_api.totalsegmentator``.

    ``input``: a NIfTI path, DICOM folder or zip, fsspec or DICOMweb URI, or a nibabel
    image. ``output``: a folder, or a ``.nii.gz`` file with ``ml=True``; None writes nothing
    (with ``dicomweb_store``, only the DICOM outputs are stored). ``options``: the fields of
    ``SegmentOptions`` and ``OutputOptions``, ``no_derived_masks=True``, ``report=PATH``
    (the run report) and ``statistics=PATH`` (statistics.json at PATH instead of in the
    output folder, also with ``output`` None) as TotalSegmentator's. ``backend``: what runs
    the networks (auto, torch, openvino; ``raytseg.pipeline.backends``). Returns the multilabel
    image (label table in its header extension), with the statistics dict when statistics
    are asked for.
    """
    started, settings = time.perf_counter(), Settings.from_env()
    source = "Nifti1Image" if isinstance(input, nib.Nifti1Image) else str(input)
    request = _api_request(source, None if output is None else str(output), task, options)
    segmenter = default_segmenter(device, settings, backend)
    volume = load_volume(input, LoadLimits.from_settings(settings))
    seg, _ = run_local(segmenter, volume, request, started)
    img = seg.to_nifti()
    return (img, seg.statistics or {}) if request.options.statistics else img


def _api_request(source: str, target: str | None, task: str, options: dict[str, Any]) -> LocalRequest:
    """The request of the Python API's keywords, TotalSegmentator's spellings included
    (``no_derived_masks``, ``statistics=PATH``), and the run report's path (``report``)."""
    if "no_derived_masks" in options:
        options["derived_masks"] = not options.pop("no_derived_masks")
    report = options.pop("report", None)
    values, places = placed_files({"task": task, **options})
    opts, out = split_options(values)
    return LocalRequest(source, target, opts, out, places, None if report is None else str(report))
