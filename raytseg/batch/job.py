"""The batch job on Ray Data: list, skip what is done, stream the rest, write the table.

    items ─▶ read+prepare ─▶ model[0] ─▶ advance[0] ─▶ ... ─▶ model[D-1] ─▶ advance[D-1] ─▶ results
             CPU tasks       actor pool   CPU tasks           actor pool    CPU tasks (write)

One row per item, one item per block and batch, so Ray Data streams items through the
stages independently: while the model actors predict one item, CPU tasks load and
preprocess the next ones and export the previous ones. Rows carry a pickled
``ItemState``: network inputs, labels and small records; the image itself only when a
later step reads its voxels (``needs_voxels_later``), which keeps big volumes out of the
object store in the common case.

Crop passes (``roi_subset``, ``body_seg``, tasks such as ``lung_vessels``) get a model
stage of their own: the pipeline has one (model, advance) pair per pass of the deepest
request, and an item with fewer passes flows through the rest untouched. So the coarse
crop model and the task's models each stay resident in their own actors, CPU work never
runs inside a model actor, and one job may mix tasks with and without crop passes.

Reliability: an error inside a step is a failed row, never a failed job. When a process
dies (out of memory, a lost node), Ray runs its item again, up to ``retries`` times (tasks:
``max_retries``; model actors restart and retry the call: ``max_task_retries``); an item
whose retries run out is dropped by Ray Data (``max_errored_blocks=-1``) and reported here
as failed with ``WorkerCrashedError``. Outputs are committed atomically (``commit.py``).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from raytseg import storage
from raytseg.batch import stages
from raytseg.batch.config import BatchConfig, failures_exceeded
from raytseg.batch.inputs import WorkItem, work_items
from raytseg.batch.item import JobSpec
from raytseg.batch.results import (
    BatchReport,
    ItemResult,
    JobProgress,
    ProgressCallback,
    parquet_bytes,
    results_table,
)
from raytseg.batch.triage import check_job_options, failed_result, model_levels, triage
from raytseg.config import Settings
from raytseg.errors import WorkerCrashedError
from raytseg.tasks import ModelSpec

log = logging.getLogger(__name__)
ENTRYPOINT = "batch"
# Stage names as the service reports them ("write" is export plus the commit here).
_METRIC_STAGES = {"write": "export", "total": "end_to_end"}


def run_batch(
    config: BatchConfig,
    *,
    settings: Settings | None = None,
    progress: ProgressCallback | None = None,
    worker_logs: bool = False,
) -> BatchReport:
    """Segment every item of ``config.input`` into ``config.output`` on Ray.

    Starts a local Ray (``config.address`` or ``RAY_ADDRESS`` join a cluster instead) and
    shuts down only what it started. ``progress`` is called after every item.

    Raises:
        InputError: the job cannot start (bad input listing or manifest, unknown task,
            bad options); per-item problems become failed rows instead.
        LicenseError: the job's task needs a license that is not set.
        StorageError: the listing or the results table could not be read or written.

    Example:
        >>> config = BatchConfig(input="s3://bucket/cts/", output="s3://bucket/seg/", fast=True)
        >>> report = run_batch(config)  # doctest: +SKIP
        >>> report.count("failed"), report.results_uri  # doctest: +SKIP
        (0, 's3://bucket/seg/_results.parquet')
    """
    started = time.monotonic()
    settings = settings or Settings.from_env()
    job = JobSpec(config, settings, run_id=_run_id())
    stages.configure_storage(config)
    check_job_options(config, settings)
    items = work_items(config.input, config.output, job.retry)
    todo, finished = triage(items, job)
    tracker = JobProgress(total=len(items))
    for result in finished:
        _report(tracker, result, progress)
    results = list(finished)
    if todo:
        results += _run_on_ray(todo, finished, job, tracker, progress, worker_logs=worker_logs)
    return _finished(results, job, started)


def _finished(results: list[ItemResult], job: JobSpec, started: float) -> BatchReport:
    """Write the results table, drop the staging area, and sum the job up."""
    config = job.config
    _write_table(config.results_uri, results, job)
    storage.remove_tree(config.staging_uri)
    failed = sum(r.status == "failed" for r in results)
    return BatchReport(
        results=tuple(results),
        results_uri=config.results_uri,
        elapsed_s=time.monotonic() - started,
        failures_exceeded=failures_exceeded(failed, len(results), config.max_failures),
    )


def _run_on_ray(
    todo: Sequence[WorkItem],
    finished: Sequence[ItemResult],
    job: JobSpec,
    tracker: JobProgress,
    progress: ProgressCallback | None,
    *,
    worker_logs: bool,
) -> list[ItemResult]:
    levels = model_levels(todo, job)
    if job.settings.weights_uri is None:  # checking remote weights would download them to the driver
        from raytseg.weights.store import WeightsStore
        from raytseg.weights.synth import warn_if_synthetic

        warn_if_synthetic((spec for level in levels for spec in level), WeightsStore(job.settings))
    results: dict[str, ItemResult] = {}
    with ray_session(job.config, job.settings, worker_logs=worker_logs), _data_context(job.config):
        for result in finished:  # metrics need Ray, so the results known up front count here
            _record_metrics(result, pending=len(todo))
        for result in _stream(todo, job, levels):
            results[result.id] = result
            _report(tracker, result, progress)
            _record_metrics(result, pending=len(todo) - len(results))
        for item in todo:
            if item.id not in results:
                results[item.id] = _crashed(item, job)
                _report(tracker, results[item.id], progress)
    return [results[item.id] for item in todo]


def _stream(todo: Sequence[WorkItem], job: JobSpec, levels: list[list[ModelSpec]]) -> Iterator[ItemResult]:
    import ray.data

    rows = [{"item": item.to_json()} for item in todo]
    ds: Any = ray.data.from_items(rows, override_num_blocks=len(rows))  # one item per block
    cpu = _cpu_args(job)
    with warnings.catch_warnings():
        # max_retries/max_restarts have no named parameter yet (Ray 2.60); see _cpu_args.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(stages.read_stage, fn_kwargs={"job": job}, **cpu(job.config.read))
        for level, specs in enumerate(levels):
            ds = ds.map_batches(stages.ModelStage, **_model_args(job, specs, len(levels)))
            final = {"job": job, "final": level == len(levels) - 1}
            ds = ds.map_batches(stages.advance_stage, fn_kwargs=final, **cpu(job.config.write))
        if not levels:  # a tool without networks (get-modality): answered by the read stage
            final = {"job": job, "final": True}
            ds = ds.map_batches(stages.advance_stage, fn_kwargs=final, **cpu(job.config.write))
    for row in ds.iter_rows():
        yield ItemResult.from_json(row["result"])


def _cpu_args(job: JobSpec) -> Callable[[Any], dict[str, Any]]:
    import ray.data

    def args(stage: Any) -> dict[str, Any]:
        size = stage.concurrency
        return {
            "batch_size": 1,
            "num_cpus": stage.num_cpus,
            "compute": ray.data.TaskPoolStrategy(size=size) if size else None,
            # Also keeps Ray Data from fusing a CPU stage into the next model stage (fusion
            # needs equal remote args), which would serialise reading and predicting.
            "max_retries": job.config.retries,
        }

    return args


def _model_args(job: JobSpec, specs: list[ModelSpec], levels: int) -> dict[str, Any]:
    import ray.data

    model = job.config.model
    low, high = model.concurrency
    cpus, gpus = model.num_cpus / levels, model.num_gpus / levels  # the model stages share one budget
    return {
        "batch_size": 1,
        "compute": ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        "num_cpus": cpus,
        "num_gpus": gpus or None,
        "fn_constructor_kwargs": {"job": job, "specs": specs, "cpus": cpus},
        # A dead actor always comes back (Ray Data does not replace actors that stay dead:
        # the remaining items would wait forever); the item it held is retried
        # ``retries`` times, then dropped and reported as WorkerCrashedError.
        "max_restarts": -1,
        "max_task_retries": job.config.retries,
    }


@contextmanager
def ray_session(config: BatchConfig, settings: Settings, *, worker_logs: bool = False) -> Iterator[None]:
    """Join ``config.address`` / ``RAY_ADDRESS``, or start a small local Ray; stop only what was started."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = config.address or settings.ray_address
    # ray.init resets the "ray" logger's level: keep the one the application chose.
    common: dict[str, Any] = {
        "log_to_driver": worker_logs,
        "logging_level": logging.getLogger("ray").getEffectiveLevel(),
    }
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(
            # "local": a new Ray, never one that `ray start` left running on this machine
            # (which a bare ray.init() would join).
            address="local",
            num_cpus=config.num_cpus or os.cpu_count() or 1,
            object_store_memory=config.object_store_mb * 1024**2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **common,
        )
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _data_context(config: BatchConfig) -> Iterator[None]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.max_errored_blocks, ctx.execution_no_progress_timeout_s)
    ctx.enable_progress_bars = False  # the CLI draws its own, per item
    ctx.max_errored_blocks = -1  # an item whose worker keeps dying is reported, not fatal
    ctx.execution_no_progress_timeout_s = config.no_progress_timeout_s or -1
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks, ctx.execution_no_progress_timeout_s = saved


# --- results -------------------------------------------------------------------------


def _crashed(item: WorkItem, job: JobSpec) -> ItemResult:
    error = WorkerCrashedError(
        f"The worker segmenting {item.id} died {job.config.retries + 1} time(s) (out of memory, or a "
        "lost node). Check the Ray logs; give the stages more memory, or raise retries."
    )
    return failed_result(item, item.task or job.config.task, error)


def _report(tracker: JobProgress, result: ItemResult, progress: ProgressCallback | None) -> None:
    tracker.add(result)
    if progress is not None:
        progress(tracker, result)


def _record_metrics(result: ItemResult, *, pending: int) -> None:
    from raytseg.metrics import recorder

    metrics = recorder()
    metrics.request(result.task, result.status, ENTRYPOINT)
    metrics.queue_depth(pending, ENTRYPOINT)
    if result.status == "failed":
        metrics.error(result.task, result.error_type or "Internal", ENTRYPOINT)
    for stage, seconds in result.timings.items():
        metrics.stage(result.task, _METRIC_STAGES.get(stage, stage), seconds, ENTRYPOINT)
    if result.status == "ok" and result.voxels:
        metrics.voxels(result.task, result.voxels, ENTRYPOINT)


def _write_table(location: str, results: Sequence[ItemResult], job: JobSpec) -> None:
    data = parquet_bytes(results_table(results))
    job.retry.call(lambda: storage.write_bytes(location, data), f"Writing {location}")


def _run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
