"""One item's way through the batch pipeline, as steps over a picklable ``ItemState``.

    start ──▶ predict ──▶ advance ──▶ predict ──▶ advance ...   one (predict, advance) per pass
    load, plan,  models     finish the pass; crop pass: find the
    prepare      (actor)    region, prepare the next pass; main pass:
    pass 0                  export, stage, commit, mark

A request runs the passes ``admit`` gives (crop passes first, the main pass last), and
what follows each pass is ``after_pass``'s answer, as in ``Segmenter``. The steps call
the same stage functions as ``Segmenter`` (``prepare``, ``finish``, ``after_pass``,
``write_segmentation``), so outputs are byte-identical to
``raytseg segment``. No step imports Ray: the Ray adapter
(``raytseg.batch.job``) runs them in tasks and actors, tests run them in-process.

Any error inside a step turns the item into a failed result and the item flows on
untouched; only the process dying (out of memory, a lost node) escapes, and Ray retries
the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from raytseg import dicomweb, storage
from raytseg.batch.commit import OutputStore
from raytseg.batch.config import BatchConfig
from raytseg.batch.inputs import WorkItem
from raytseg.batch.results import ItemResult
from raytseg.config import Settings
from raytseg.errors import InputError, InvalidOptionError, LicenseError
from raytseg.pipeline.export import check_model_grid, check_output, reads_image, write_segmentation
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.modality import Segment, admit_image
from raytseg.pipeline.passes import Region, after_pass, finish, prepare
from raytseg.pipeline.plan import Pass
from raytseg.pipeline.preprocess import ModelPlans, model_key
from raytseg.pipeline.records import (
    NetworkOutput,
    Prepared,
    Segmentation,
    SegmentOptions,
    TaskChoice,
    Volume,
)
from raytseg.pipeline.tools import ToolRequest, answer_of, run_label
from raytseg.retry import RetryPolicy
from raytseg.tasks import ModelSpec

if TYPE_CHECKING:
    from raytseg.pipeline.model import Network

log = logging.getLogger(__name__)


class Models(Protocol):
    """Resident networks by spec, and whole segmentations for the tools (``Segmenter`` is one)."""

    def model(self, spec: ModelSpec) -> Network: ...

    def segment(self, volume: Volume, options: SegmentOptions) -> Segmentation: ...


class Plans(Protocol):
    """plans.json and dataset.json by spec (``Segmenter`` is one)."""

    def plans(self, spec: ModelSpec) -> ModelPlans: ...


@dataclass(frozen=True)
class JobSpec:
    """What every step of one run needs; built on the driver, shipped to the workers."""

    config: BatchConfig
    settings: Settings
    run_id: str

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.config.storage.retries, self.config.storage.retry_delay_s)

    @property
    def limits(self) -> LoadLimits:
        return LoadLimits.from_settings(self.settings)

    def outputs(self) -> OutputStore:
        return OutputStore(self.config.staging_uri, self.retry)

    def options_for(self, item: WorkItem) -> SegmentOptions:
        tool = self.config.tool
        if tool is not None and item.task is not None:
            raise InvalidOptionError(
                f"Item {item.id} names task {item.task!r}, but this job runs {tool.name}, which segments "
                "what it needs: leave the manifest's task out."
            )
        return self.config.segment_options(item.task)

    def label_for(self, item: WorkItem) -> str:
        """What the item is asked to run: its task, or the job's tool."""
        return run_label(item.task or self.config.task, self.config.tool)

    def fingerprint(self, item: WorkItem) -> str:
        """Identifies what the outputs depend on, to tell a complete item from a stale one."""
        config = self.config
        asked = {
            "options": self.options_for(item).model_dump(mode="json"),
            "files": [config.ml, config.derived_masks, config.preview],
        }
        if config.tool is not None:  # only then: segmentations keep their earlier fingerprints
            asked["tool"] = config.tool.model_dump(mode="json")
        return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ItemState:
    """An item between steps. Heavy fields are dropped as soon as no later step needs them."""

    item: WorkItem
    options: SegmentOptions  # as run: after the MR rule, or task auto's choice
    fingerprint: str
    attempt: str
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    passes: tuple[Pass, ...] = ()  # crop passes (innermost first), then the main pass
    level: int = 0  # the index of the pass being run
    volume: Volume | None = None
    voxels: int | None = None
    region: Region | None = None
    prepared: Prepared | None = None
    outputs: tuple[NetworkOutput, ...] = ()
    result: ItemResult | None = None
    task_choice: TaskChoice | None = None  # what task auto chose, and why
    tool: ToolRequest | None = None  # a tool's item: its answer instead of passes
    answer: bytes | None = None

    @property
    def active(self) -> bool:
        return self.result is None

    @property
    def label(self) -> str:
        """What the item runs: its task, or the tool's name."""
        return run_label(self.options.task, self.tool)

    @property
    def awaits_tool(self) -> bool:
        return self.active and self.tool is not None and self.answer is None and self.volume is not None

    @property
    def awaits_models(self) -> bool:
        return self.active and self.prepared is not None and bool(self.prepared.inputs)


# --- the steps -----------------------------------------------------------------------


def start(item: WorkItem, job: JobSpec, plans: Plans) -> ItemState:
    """Load the image, plan its passes and prepare the first one."""
    state = ItemState(
        item=item,
        options=job.options_for(item),
        fingerprint=job.fingerprint(item),
        attempt=f"{job.run_id}-{uuid.uuid4().hex[:8]}",
        tool=job.config.tool,
    )
    _guarded(state, job, lambda: _load_and_prepare(state, job, plans))
    return state


def predict(state: ItemState, job: JobSpec, models: Models) -> None:
    """Run the current pass's networks on its prepared inputs (the model stage)."""
    if state.awaits_models:
        _guarded(state, job, lambda: _predict(state, models))
    elif state.awaits_tool:
        _guarded(state, job, lambda: _answer(state, models))


def advance(state: ItemState, job: JobSpec, plans: Plans) -> None:
    """Finish the current pass, then prepare the next one or write the outputs (or write a
    tool's answer)."""
    if state.active and state.answer is not None:
        _guarded(state, job, lambda: _write_answer(state, job))
    elif state.active and state.prepared is not None and not state.prepared.inputs:
        _guarded(state, job, lambda: _advance(state, job, plans))


def result_of(state: ItemState) -> ItemResult:
    """The item's result; an item that did not get through every pass is failed."""
    if state.result is not None:
        return state.result
    return _failed_result(state, "InternalError", "The item left the pipeline before it was written.")


# --- what the steps do ---------------------------------------------------------------


def _load_and_prepare(state: ItemState, job: JobSpec, plans: Plans) -> None:
    with _timed(state, "load"):
        source = state.item.input
        volume = job.retry.call(lambda: load_volume(source, job.limits), f"Reading {source}")
    if state.tool is not None:
        _ready_for_tool(state, state.tool, volume)
        return
    check_output(job.config.output_options, volume)
    check_model_grid(state.options, job.config.output_options)
    admitted, state.task_choice = admit_image(state.options, job.settings, volume, _roi_segmenter(job))
    state.options, state.passes = admitted.options, admitted.passes
    state.volume, state.voxels = volume, math.prod(volume.shape)
    _prepare_pass(state, plans, region=None)
    if not needs_voxels_later(state.passes, job.config):
        state.volume = _without_voxels(volume)


def _ready_for_tool(state: ItemState, tool: ToolRequest, volume: Volume) -> None:
    """A tool that needs no network (get-modality's intensity classifier) answers here;
    the others in the model stage, whose networks segment what they need."""
    state.voxels = math.prod(volume.shape)
    if tool.segmentations:
        state.volume = volume
        return
    with _timed(state, "model"):
        state.answer = answer_of(tool, volume, None)


def _answer(state: ItemState, models: Models) -> None:
    assert state.tool is not None
    assert state.volume is not None
    with _timed(state, "model"):
        state.answer = answer_of(state.tool, state.volume, models.segment)
    state.volume = None


def _roi_segmenter(job: JobSpec) -> Segment:
    """Task auto's ROI classifier segments, when an image needs it, here in the load stage
    (on its CPU; the model stages serve only the tasks auto may choose)."""

    def segment(volume: Volume, options: SegmentOptions) -> Segmentation:
        from raytseg.pipeline.run import default_segmenter

        return default_segmenter("cpu", job.settings, job.config.backend).segment(volume, options)

    return segment


def _predict(state: ItemState, models: Models) -> None:
    assert state.prepared is not None
    specs = {model_key(spec): spec for spec in state.passes[state.level].plan.main.models}
    with _timed(state, "model"):
        state.outputs = tuple(models.model(specs[x.model_key]).predict(x) for x in state.prepared.inputs)
    # The inputs are spent; only the inverse record travels on.
    state.prepared = dataclasses.replace(state.prepared, inputs=())


def _advance(state: ItemState, job: JobSpec, plans: Plans) -> None:
    assert state.prepared is not None
    assert state.volume is not None
    with _timed(state, "postprocess"):
        step = state.passes[state.level]
        seg = finish(state.volume, step, state.prepared, state.outputs, state.region)
        state.prepared, state.outputs = None, ()
        following = after_pass(state.volume, state.passes, state.level, seg)
    if isinstance(following, Segmentation):
        if following is not seg:
            log.info("%s: the crop region is empty; writing an empty segmentation.", state.item.id)
        _write(state, job, following)
    else:
        state.level += 1
        _prepare_pass(state, plans, following)


def _prepare_pass(state: ItemState, plans: Plans, region: Region | None) -> None:
    assert state.volume is not None
    step = state.passes[state.level]
    model_plans = {model_key(spec): plans.plans(spec) for spec in step.plan.main.models}
    with _timed(state, "preprocess"):
        state.prepared = prepare(state.volume, step, model_plans, region)
    state.region = region


def _write(state: ItemState, job: JobSpec, seg: Segmentation) -> None:
    assert state.volume is not None
    config, store = job.config, job.outputs()
    staged = store.staging_dir(state.item.id, state.attempt)
    started = time.perf_counter()
    volume = state.volume
    written = job.retry.call(
        lambda: write_segmentation(seg, volume, staged, config.output_options), f"Writing {state.item.id}"
    )
    state.volume = None
    state.timings["write"] = time.perf_counter() - started  # the marker records it without the commit
    # Files are committed from the staging folder; instances stored on a DICOMweb server are
    # there already (the write returned once the server had accepted them).
    names = [storage.base_name(loc) for loc in written if not dicomweb.is_dicomweb(loc)]
    stored = [loc for loc in written if dicomweb.is_dicomweb(loc)]
    result = _ok_result(state, seg, names, stored)
    result = dataclasses.replace(result, report=_report(state, job, seg, result.outputs))
    _commit(state, job, staged, names, result, started)


def _write_answer(state: ItemState, job: JobSpec) -> None:
    """The tool's JSON file, staged and committed like a segmentation's files."""
    assert state.tool is not None
    assert state.answer is not None
    name, answer, started = state.tool.file_name, state.answer, time.perf_counter()
    staged = job.outputs().staging_dir(state.item.id, state.attempt)
    file = storage.join(staged, name)
    job.retry.call(lambda: storage.write_bytes(file, answer), f"Writing {state.item.id}")
    state.timings["write"] = time.perf_counter() - started
    outputs = (storage.join(state.item.output, name),)
    _commit(
        state,
        job,
        staged,
        [name],
        _result(state, status="ok", outputs=outputs, answer=answer.decode()),
        started,
    )


def _commit(  # noqa: PLR0913 - the item, where its files are, and what its marker says
    state: ItemState, job: JobSpec, staged: str, names: list[str], result: ItemResult, started: float
) -> None:
    """Move the staged files into the item's folder with its marker (``result``)."""
    store = job.outputs()
    store.commit(staged, state.item.output, names, json.loads(result.to_json()))
    state.timings["write"] = time.perf_counter() - started
    state.result = dataclasses.replace(result, timings=_final_timings(state))
    store.discard(state.item.id)


# --- helpers -------------------------------------------------------------------------


def needs_voxels_later(passes: tuple[Pass, ...], config: BatchConfig) -> bool:
    """Whether a step after the first model pass reads the input's voxels.

    They are needed to prepare a pass after a crop pass, for statistics on the input grid,
    and for the files that read the image (``export.reads_image``). Otherwise they are
    dropped after preprocessing, so the image itself never travels through the model stage.
    """
    main = passes[-1]
    return (
        len(passes) > 1
        or (main.options.statistics and not main.plan.fast_statistics)
        or reads_image(config.output_options, main.plan.main.task)
    )


def _without_voxels(volume: Volume) -> Volume:
    # Header, affine and source are all ``finish`` and ``write`` read when
    # needs_voxels_later() is False; an empty array makes any other read fail loudly.
    return dataclasses.replace(volume, data=np.empty((0, 0, 0), dtype=volume.data.dtype))


def _guarded(state: ItemState, job: JobSpec, step: Callable[[], None]) -> None:
    try:
        step()
    except Exception as exc:
        if isinstance(exc, InputError | LicenseError):
            log.warning("%s failed: %s", state.item.id, exc)
        else:
            log.exception("%s failed", state.item.id)
        state.result = _failed_result(state, type(exc).__name__, str(exc))
        state.volume, state.prepared, state.outputs = None, None, ()
        job.outputs().discard(state.item.id, state.attempt)


def _ok_result(state: ItemState, seg: Segmentation, names: list[str], stored: list[str]) -> ItemResult:
    from raytseg.pipeline.stats import statistics_json

    return _result(
        state,
        status="ok",
        outputs=(*(storage.join(state.item.output, name) for name in names), *stored),
        statistics=None if seg.statistics is None else statistics_json(seg.statistics).decode(),
    )


def _report(state: ItemState, job: JobSpec, seg: Segmentation, outputs: tuple[str, ...]) -> str:
    from raytseg.pipeline.report import ReportedRun, device_name, run_report

    item, config = state.item, job.config
    run = ReportedRun.of(
        dataclasses.replace(seg, task_choice=state.task_choice),
        (item.input, item.output),
        state.options,
        files=config.output_options,
        device=device_name(config.device),
        written=outputs,
        runtime_s=time.time() - state.started,
    )
    # The item's own stage timings: its passes ran in separate Ray tasks.
    return json.dumps(run_report(dataclasses.replace(run, timings=dict(state.timings))))


def _failed_result(state: ItemState, error_type: str, message: str) -> ItemResult:
    return _result(state, status="failed", error_type=error_type, error_message=message)


def _result(state: ItemState, **outcome: Any) -> ItemResult:
    """The row of ``state``'s item, with what its run ended in."""
    item = state.item
    return ItemResult(
        id=item.id,
        input=item.input,
        output=item.output,
        task=state.label,
        voxels=state.voxels,
        timings=_final_timings(state),
        finished_at=_now(),
        attempt=state.attempt,
        fingerprint=state.fingerprint,
        **outcome,
    )


def _final_timings(state: ItemState) -> dict[str, float]:
    return {**state.timings, "total": time.time() - state.started}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def _timed(state: ItemState, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        state.timings[stage] = state.timings.get(stage, 0.0) + time.perf_counter() - started
