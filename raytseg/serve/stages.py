"""The CPU stages: load + preprocess before the networks, postprocess + export after.

One class, deployed twice (``Preprocess`` and ``Postprocess``) with their own sizes and
autoscaling: the two halves cost differently (resampling up front, resampling back plus
gzip at the end), and separate replica pools keep a long export from queueing in front
of the next request's preprocessing. The class stays one, because both halves need the
same setup (weights store, plans cache, limits) and it keeps the adapter thin: every
method is a call into ``raytseg.pipeline``.

Methods are synchronous (Serve runs them on a thread pool, ``max_ongoing_requests`` at a
time) and return their results; large ones stay in the object store for the next stage
(see ``raytseg.serve.handoff``).
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from raytseg.metrics import recorder
from raytseg.pipeline.export import class_mask_files, multilabel_nifti_bytes, write_segmentation
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.plan import CropPass, RunPlan
from raytseg.pipeline.preprocess import ModelPlans, model_key
from raytseg.pipeline.records import NetworkOutput, Prepared, Segmentation, SegmentOptions, Volume
from raytseg.pipeline.run import empty_segmentation, extra_outputs, find_region, finish, prepare
from raytseg.pipeline.stats import statistics_json
from raytseg.serve.config import ServeConfig
from raytseg.serve.handoff import Delivered, Delivery, FoundRegion, Tags, own_arrays
from raytseg.serve.runtime import model_spec, weights_store
from raytseg.storage import join

log = logging.getLogger(__name__)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same segmentation zips to the same bytes


@dataclass(frozen=True)
class PassSpec:
    """One model pass of a request: what to run and how to report it."""

    plan: RunPlan
    options: SegmentOptions
    tags: Tags
    delivery: Delivery = Delivery()


class CpuStage:
    """Load, preprocess, postprocess and export for the Serve app (no GPU).

    Arguments named ``volume``, ``prepared``, ``found`` and ``outputs`` arrive as results
    of earlier calls (Ray resolves the responses the caller passed); ``prepared`` is None
    when the pass's crop region was empty, and ``found`` is None when there is no crop pass.
    """

    def __init__(self, config: ServeConfig) -> None:
        self._store = weights_store(config)
        self._limits = LoadLimits(config.limits.max_voxels, config.limits.max_archive_bytes)
        self._plans: dict[str, ModelPlans] = {}

    def load(self, source: bytes | str, tags: Tags) -> Volume:
        """Read the upload (bytes) or a job's input location."""
        with _timed(tags, "load"):
            return load_volume(source, self._limits)

    def prepare(self, spec: PassSpec, volume: Volume, found: FoundRegion | None) -> Prepared | None:
        """Crop, resample and normalise for every model of the pass."""
        if found is not None and found.region is None:
            return None
        with _timed(spec.tags, "preprocess"):
            plans = {model_key(m): self._model_plans(model_key(m)) for m in spec.plan.main.models}
            return prepare(own_arrays(volume), spec.plan, plans, None if found is None else found.region)

    def find_region(  # noqa: PLR0913 - upstream results must be top-level arguments
        self,
        spec: PassSpec,
        crop: CropPass,
        volume: Volume,
        prepared: Prepared | None,
        found: FoundRegion | None,
        *outputs: tuple[NetworkOutput, ...],
    ) -> FoundRegion:
        """Finish a crop pass and find the region its rois cover (None when empty)."""
        if prepared is None:  # its own crop region was empty, so is this one
            return FoundRegion(None)
        with _timed(spec.tags, "postprocess"):
            seg = self._segmentation(spec, volume, prepared, found, outputs)
            return FoundRegion(find_region(volume, crop, seg))

    def finish(  # noqa: PLR0913 - upstream results must be top-level arguments
        self,
        spec: PassSpec,
        volume: Volume,
        prepared: Prepared | None,
        found: FoundRegion | None,
        *outputs: tuple[NetworkOutput, ...],
    ) -> Delivered:
        """Postprocess the main pass, then export it as the request asked."""
        if prepared is None:  # TotalSegmentator answers an empty crop region with zeros
            seg = empty_segmentation(volume, spec.plan, spec.options)
        else:
            with _timed(spec.tags, "postprocess"):
                seg = self._segmentation(spec, volume, prepared, found, outputs)
        with _timed(spec.tags, "export"):
            delivered = _deliver(seg, volume, spec.delivery)
        recorder().voxels(spec.tags.task, int(np.prod(volume.shape)), spec.tags.entrypoint)
        return delivered

    def check_health(self) -> None:
        """Nothing to check beyond the replica answering: it holds no device or network."""

    def _segmentation(
        self,
        spec: PassSpec,
        volume: Volume,
        prepared: Prepared,
        found: FoundRegion | None,
        outputs: tuple[tuple[NetworkOutput, ...], ...],
    ) -> Segmentation:
        owned = tuple(own_arrays(o) for per_model in outputs for o in per_model)
        region = None if found is None else found.region
        return finish(volume, spec.plan, spec.options, own_arrays(prepared), owned, region)

    def _model_plans(self, key: str) -> ModelPlans:
        if key not in self._plans:
            spec = model_spec(key)
            plans, dataset_json = self._store.read_plans(spec)
            self._plans[key] = ModelPlans(key, spec.configuration, plans, dataset_json)
        return self._plans[key]


def _deliver(seg: Segmentation, volume: Volume, delivery: Delivery) -> Delivered:
    extra = extra_outputs(seg, volume, ml=delivery.ml)
    if delivery.output is not None:
        target = delivery.output
        if delivery.ml and not target.endswith((".nii", ".nii.gz")):
            target = join(target, "seg.nii.gz")
        written = write_segmentation(seg, target, ml=delivery.ml, extra_files=extra)
        return Delivered(None, "application/json", "", tuple(written), seg.statistics)
    if delivery.ml and seg.statistics is None:
        return Delivered(multilabel_nifti_bytes(seg), "application/gzip", f"{seg.task}.nii.gz")
    body = _zip(seg, extra, ml=delivery.ml)
    return Delivered(body, "application/zip", f"{seg.task}.zip", (), seg.statistics)


def _zip(seg: Segmentation, extra: dict[str, bytes], *, ml: bool) -> bytes:
    """The files TotalSegmentator would write to its output folder, as one zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # members are gzip already
        for name, data in _members(seg, extra, ml=ml):
            archive.writestr(zipfile.ZipInfo(name, _ZIP_TIME), data)
    return buffer.getvalue()


def _members(seg: Segmentation, extra: dict[str, bytes], *, ml: bool) -> Iterator[tuple[str, bytes]]:
    if ml:
        yield f"{seg.task}.nii.gz", multilabel_nifti_bytes(seg)
    else:
        yield from class_mask_files(seg)
    yield from extra.items()
    if seg.statistics is not None:
        yield "statistics.json", statistics_json(seg.statistics)


@contextmanager
def _timed(tags: Tags, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    recorder().stage(tags.task, tags.stage(stage), time.perf_counter() - started, tags.entrypoint)
