"""Before Ray starts: which items need running, and what is already known about the rest.

An item whose completion marker exists is *skipped* (its row is rebuilt from the marker),
unless the marker was written with other options: then the item *fails* with
``StaleOutputError`` rather than mixing outputs of two configurations (``--overwrite``
recomputes it). An item whose per-row task is unknown or unlicensed fails here too, so a
bad row never reaches the workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from raytseg.batch.config import BatchConfig
from raytseg.batch.inputs import WorkItem
from raytseg.batch.item import JobSpec
from raytseg.batch.results import ItemResult
from raytseg.config import Settings
from raytseg.errors import InputError, LicenseError, RaytsegError, StaleOutputError
from raytseg.pipeline.plan import admit, candidates, check_candidates
from raytseg.pipeline.preprocess import model_key
from raytseg.pipeline.records import SegmentOptions
from raytseg.tasks import ModelSpec


def check_job_options(config: BatchConfig, settings: Settings) -> None:
    """Fail fast on a bad job-wide task or options, or a tool whose models are not there
    (per-row tasks fail their rows only)."""
    if config.tool is not None:
        for options in config.tool.segmentations:
            admit(options, settings)
        return
    check_candidates(config.segment_options(), lambda options: admit(options, settings))


def triage(items: Sequence[WorkItem], job: JobSpec) -> tuple[list[WorkItem], list[ItemResult]]:
    """Items to run, and results known without running: skipped, stale, bad per-row task."""
    markers = {} if job.config.overwrite else job.outputs().read_markers([i.output for i in items])
    todo: list[WorkItem] = []
    finished: list[ItemResult] = []
    row_errors: dict[str | None, RaytsegError | None] = {}  # by the row's own task (None: none)
    for item in items:
        marker = markers.get(item.output)
        if marker is not None:
            finished.append(_from_marker(item, marker, job))
            continue
        if item.task not in row_errors:
            row_errors[item.task] = _task_error(job, item)
        error = row_errors[item.task]
        if error is None:
            todo.append(item)
        else:
            finished.append(failed_result(item, job.label_for(item), error))
    return todo, finished


def model_levels(items: Sequence[WorkItem], job: JobSpec) -> list[list[ModelSpec]]:
    """The networks each model stage serves: level k runs the k-th pass of every item (of
    every task an item of task auto may run); a tool's item runs its segmentations at level 0,
    whose actors load what it needs beyond them (get-phase's neck model) on first use."""
    levels: list[dict[str, ModelSpec]] = []
    for options in _segmentations(items, job):
        for level, step in enumerate(admit(options, job.settings).passes):
            if level == len(levels):
                levels.append({})
            levels[level].update({model_key(spec): spec for spec in step.plan.main.models})
    return [list(specs.values()) for specs in levels]


def _segmentations(items: Sequence[WorkItem], job: JobSpec) -> set[SegmentOptions]:
    if job.config.tool is not None:
        return set(job.config.tool.segmentations)
    return {run for item in items for run in candidates(job.options_for(item))}


def failed_result(item: WorkItem, task: str, error: Exception) -> ItemResult:
    """The row of an item that failed before (or without) running."""
    return ItemResult(
        id=item.id,
        input=item.input,
        output=item.output,
        task=task,
        status="failed",
        error_type=type(error).__name__,
        error_message=str(error),
    )


def _task_error(job: JobSpec, item: WorkItem) -> RaytsegError | None:
    try:
        options = job.options_for(item)  # a tool's item: refused if its row names a task
        if job.config.tool is None:
            check_candidates(options, lambda asked: admit(asked, job.settings))
    except (InputError, LicenseError) as exc:
        return exc
    return None


def _from_marker(item: WorkItem, marker: dict[str, Any], job: JobSpec) -> ItemResult:
    done = ItemResult.from_dict(marker)
    if done.fingerprint != job.fingerprint(item):
        error = StaleOutputError(
            f"{item.output} holds outputs made with other options. Pass --overwrite to replace them, "
            "or write this job to another output."
        )
        return failed_result(item, done.task, error)
    return replace(done.as_skipped(), input=item.input, output=item.output)
