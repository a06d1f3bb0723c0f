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
from raytseg.pipeline.export import (
    DICOM_NAMES,
    MULTILABEL_NAME,
    check_output,
    output_files,
    write_segmentation,
)
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.modality import (
    ModalityEvidence,
    ModalityGuess,
    modality_evidence,
    modality_of,
    roi_modality,
)
from raytseg.pipeline.passes import after_pass, finish, prepare
from raytseg.pipeline.phase import PhaseGuess, Stats, phase_from
from raytseg.pipeline.plan import Pass
from raytseg.pipeline.preprocess import PlansCache, model_key
from raytseg.pipeline.records import NetworkOutput, OutputOptions, Prepared, Segmentation, Volume
from raytseg.serve.config import ServeConfig
from raytseg.serve.handoff import AfterPass, Delivered, Delivery, Tags, own_arrays
from raytseg.serve.runtime import weights_store

log = logging.getLogger(__name__)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same segmentation zips to the same bytes


@dataclass(frozen=True)
class PassSpec:
    """One model pass of a request (``passes[index]``): what to run and how to report it."""

    passes: tuple[Pass, ...]
    index: int
    tags: Tags
    delivery: Delivery = Delivery()

    @property
    def step(self) -> Pass:
        return self.passes[self.index]


class CpuStage:
    """Load, preprocess, postprocess and export for the Serve app (no GPU).

    Arguments named ``volume``, ``prepared``, ``before`` and ``outputs`` arrive as results
    of earlier calls (Ray resolves the responses the caller passed); ``before`` is what
    followed the previous pass (None for the first), and ``prepared`` is None when that
    was already the answer (an empty crop region).
    """

    def __init__(self, config: ServeConfig) -> None:
        self._store = weights_store(config)
        self._limits = LoadLimits(config.limits.max_voxels, config.limits.max_archive_bytes)
        self._plans = PlansCache(self._store)

    def load(self, source: bytes | str, tags: Tags, output: OutputOptions) -> Volume:
        """Read the upload (bytes) or a job's input location; refuse outputs it cannot give."""
        with _timed(tags, "load"):
            volume = load_volume(source, self._limits)
        check_output(output, volume)
        return volume

    def modality(self, volume: Volume) -> str | None:
        """The loaded image's DICOM Modality, for the MR rule (``admit``)."""
        return volume.modality

    def modality_evidence(self, volume: Volume) -> ModalityEvidence:
        """What task auto knows of the loaded image before segmenting it."""
        return modality_evidence(volume)

    def classify_modality(self, volume: Volume) -> ModalityGuess:
        """``get-modality``'s intensity classifier on the loaded image."""
        return modality_of(volume, None)

    def roi_modality(self, statistics: Stats) -> ModalityGuess:
        """``get-modality -n``: the ROI classifier on a ``ROI_SEGMENTATION``'s statistics."""
        return roi_modality(statistics)

    def phase(self, body: Stats, neck: Stats | None) -> PhaseGuess:
        """``get-phase``'s regressors on the statistics of its segmentations."""
        return phase_from(body, neck)

    def prepare(self, spec: PassSpec, volume: Volume, before: AfterPass | None) -> Prepared | None:
        """Crop, resample and normalise for every model of the pass."""
        if before is not None and before.answer is not None:
            return None
        with _timed(spec.tags, "preprocess"):
            plans = {model_key(m): self._plans(m) for m in spec.step.plan.main.models}
            region = None if before is None else before.region
            return prepare(own_arrays(volume), spec.step, plans, region)

    def end_pass(  # noqa: PLR0913 - upstream results must be top-level arguments
        self,
        spec: PassSpec,
        volume: Volume,
        prepared: Prepared | None,
        before: AfterPass | None,
        *outputs: tuple[NetworkOutput, ...],
    ) -> AfterPass:
        """Finish a pass: what follows it (the next pass's region, or the answer)."""
        if prepared is None:  # answered before this pass: pass the answer on
            assert before is not None
            return before
        with _timed(spec.tags, "postprocess"):
            seg = self._segmentation(spec, volume, prepared, before, outputs)
            return AfterPass(after_pass(volume, spec.passes, spec.index, seg))

    def finish(  # noqa: PLR0913 - upstream results must be top-level arguments
        self,
        spec: PassSpec,
        volume: Volume,
        prepared: Prepared | None,
        before: AfterPass | None,
        *outputs: tuple[NetworkOutput, ...],
    ) -> Delivered:
        """Finish the main pass, then export the answer as the request asked."""
        answer = self.end_pass(spec, volume, prepared, before, *outputs).answer
        assert answer is not None, "the main pass always answers"
        with _timed(spec.tags, "export"):
            delivered = _deliver(answer, volume, spec.delivery)
        recorder().voxels(spec.tags.task, int(np.prod(volume.shape)), spec.tags.entrypoint)
        return delivered

    def check_health(self) -> None:
        """Nothing to check beyond the replica answering: it holds no device or network."""

    def _segmentation(
        self,
        spec: PassSpec,
        volume: Volume,
        prepared: Prepared,
        before: AfterPass | None,
        outputs: tuple[tuple[NetworkOutput, ...], ...],
    ) -> Segmentation:
        owned = tuple(own_arrays(o) for per_model in outputs for o in per_model)
        region = None if before is None else before.region
        return finish(volume, spec.step, own_arrays(prepared), owned, region)


# An answer that is one of these files alone is that file; any other answer is a zip.
SINGLE_FILE_TYPES = {MULTILABEL_NAME: "application/gzip"} | dict.fromkeys(
    DICOM_NAMES.values(), "application/dicom"
)


def _deliver(seg: Segmentation, volume: Volume, delivery: Delivery) -> Delivered:
    if delivery.statistics_only:
        return Delivered(None, "application/json", "", (), seg.statistics, seg.task)
    if delivery.output is not None:
        written = write_segmentation(seg, volume, delivery.output, delivery.files)
        return Delivered(
            None,
            "application/json",
            "",
            tuple(written),
            seg.statistics,
            seg.task,
            dict(seg.label_map),
            backends=seg.backends,
        )
    files = list(output_files(seg, volume, delivery.files))
    if len(files) == 1 and files[0][0] in SINGLE_FILE_TYPES:
        name, data = files[0]
        return Delivered(data, SINGLE_FILE_TYPES[name], name)
    return Delivered(_zip(files), "application/zip", f"{seg.task}.zip", (), seg.statistics)


def _zip(files: list[tuple[str, bytes]]) -> bytes:
    """The files TotalSegmentator would write to its output folder, as one zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # members are gzip already
        for name, data in files:
            archive.writestr(zipfile.ZipInfo(name, _ZIP_TIME), data)
    return buffer.getvalue()


@contextmanager
def _timed(tags: Tags, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    recorder().stage(tags.task, tags.stage(stage), time.perf_counter() - started, tags.entrypoint)
