"""The job API's state and worker: one detached, named Ray actor per app.

``POST /v1/jobs`` hands the job to this actor and returns at once; the actor runs it
through the same deployments as ``/v1/segment`` (at most ``jobs.max_running`` at a time)
and keeps its record. Because the actor is detached and named, it outlives any ingress
replica: a restarted or additional ingress replica finds it by name and sees every job.
Its records live in its memory; if the actor itself dies they are gone (Ray restarts it
empty), which ``GET /v1/jobs/{id}`` then reports as 404. So it lives on the head node, as
Serve's controller does: worker nodes come and go (autoscaling, spot instances, node
failures), the head stays for the life of the cluster.

A job whose run failed because a replica went away (its node was lost, or it restarted) or
a stage was full is run again from the start, a few times, within ``request_timeout_s``.
Its input is still where it was and each run writes the whole output again, so a rerun
replaces whatever an interrupted run left.

Inputs are read and outputs written by the CPU stages, through fsspec; this actor only
holds small records.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from raytseg.errors import OverloadedError, RaytsegError, ReplicaUnavailableError
from raytseg.metrics import recorder
from raytseg.pipeline.records import OutputOptions, SegmentOptions
from raytseg.serve.config import JobsSpec, ServeConfig
from raytseg.serve.errors import as_raytseg_error
from raytseg.serve.flow import Flow, StageNames
from raytseg.serve.handoff import Delivered, Delivery
from raytseg.serve.runtime import Catalogue

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)
JobState = Literal["queued", "running", "succeeded", "failed"]

# Ray's resource of the head node; Serve pins its controller with the same request.
_HEAD_NODE_RESOURCE = "node:__internal_head__"
# Runs of a job that meets a lost replica or a full stage. A lost node is noticed by the
# cluster within tens of seconds, so the delays between runs grow to cover that.
_MAX_RUNS = 4
_RETRY_DELAY_S = 5.0
_RETRY_ON = (ReplicaUnavailableError, OverloadedError)


@dataclass(frozen=True)
class JobSpec:
    """A validated job: normalised locations and segmentation options."""

    input: str
    output: str
    options: SegmentOptions
    files: OutputOptions = OutputOptions(ml=True)


@dataclass(frozen=True)
class Route:
    """How to reach the app's stages and which tasks it serves (sent with each job)."""

    names: StageNames
    config: ServeConfig

    @property
    def fingerprint(self) -> str:
        text = f"{self.names}|{self.config.model_dump_json()}"
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class JobRecord:
    """What ``GET /v1/jobs/{id}`` reports."""

    id: str
    spec: JobSpec
    state: JobState = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    outputs: tuple[str, ...] = ()
    error: dict[str, Any] | None = None
    device: str = "cpu"  # where the app's models run, for the run report
    report: dict[str, Any] | None = None  # raytseg.pipeline.report, once succeeded

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "task": self.spec.options.task,
            "input_uri": self.spec.input,
            "output_uri": self.spec.output,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "outputs": list(self.outputs),
            "error": self.error,
            "report": self.report,
        }

    def succeeded(self, delivered: Delivered) -> None:
        """Record the outcome of a successful run, with its run report."""
        from raytseg.pipeline.report import ReportedRun, run_report

        self.state, self.outputs = "succeeded", delivered.written
        run = ReportedRun(
            self.spec.input,
            self.spec.output,
            self.spec.options.model_copy(update={"task": delivered.task or self.spec.options.task}),
            self.spec.files,
            self.device,
            delivered.classes,
            delivered.written,
            runtime_s=time.time() - (self.started_at or self.created_at),
            timings={},
        )
        self.report = run_report(run)


class JobRunner:
    """Async actor: accepts jobs, runs them through the app, remembers their outcome."""

    def __init__(self, jobs: JobsSpec) -> None:
        self._spec = jobs
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self._running = asyncio.Semaphore(jobs.max_running)
        self._flows: dict[str, Flow] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, spec: JobSpec, route: Route) -> dict[str, Any]:
        """Queue a job; returns its record. Raises ``OverloadedError`` past ``max_pending``."""
        waiting = sum(r.state == "queued" for r in self._records.values())
        if waiting >= self._spec.max_pending:
            raise OverloadedError(f"{waiting} jobs are waiting already. Retry after the Retry-After delay.")
        from raytseg.pipeline.report import device_name

        record = JobRecord(uuid.uuid4().hex, spec, device=device_name(route.config.device))
        self._records[record.id] = record
        run = self._run(record, self._flow(route), route.config.request_timeout_s)
        task = asyncio.get_running_loop().create_task(run)
        self._tasks.add(task)  # keep a reference until done, or the loop may drop it
        task.add_done_callback(self._tasks.discard)
        self._report_depth()
        return record.public()

    async def status(self, job_id: str) -> dict[str, Any] | None:
        record = self._records.get(job_id)
        return None if record is None else record.public()

    def _flow(self, route: Route) -> Flow:
        key = route.fingerprint
        if key not in self._flows:
            self._flows[key] = Flow(route.names.handles(), Catalogue(route.config))
        return self._flows[key]

    async def _run(self, record: JobRecord, flow: Flow, timeout_s: float) -> None:
        async with self._running:
            record.state, record.started_at = "running", time.time()
            self._report_depth()
            task = record.spec.options.task
            try:
                delivered = await asyncio.wait_for(self._runs(record, flow), timeout_s)
            except Exception as exc:
                self._failed(record, as_raytseg_error(exc))
            else:
                record.succeeded(delivered)
                recorder().request(task, "ok", "job")
            finally:
                record.finished_at = time.time()
                recorder().stage(task, "end_to_end", record.finished_at - (record.started_at or 0), "job")
                self._forget_old()
                self._report_depth()

    async def _runs(self, record: JobRecord, flow: Flow) -> Delivered:
        """Segment the job, running it again after a lost replica or a full stage."""
        delivery = Delivery(record.spec.files, record.spec.output)
        for run in range(1, _MAX_RUNS + 1):
            try:
                return await flow.segment(record.spec.input, record.spec.options, delivery, "job")
            except _RETRY_ON as exc:
                if run == _MAX_RUNS:
                    raise
                delay = _RETRY_DELAY_S * 2 ** (run - 1)
                log.warning("Job %s: %s; running it again in %.0f s", record.id, type(exc).__name__, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last run returns or raises")

    def _failed(self, record: JobRecord, error: RaytsegError) -> None:
        record.state = "failed"
        record.error = {"type": type(error).__name__, "message": error.message, "status": error.status_code}
        recorder().request(record.spec.options.task, "failed", "job")
        recorder().error(record.spec.options.task, type(error).__name__, "job")
        log.warning("Job %s failed: %s", record.id, type(error).__name__)

    def _forget_old(self) -> None:
        finished = [k for k, r in self._records.items() if r.state in ("succeeded", "failed")]
        for key in finished[: max(0, len(finished) - self._spec.keep_finished)]:
            del self._records[key]

    def _report_depth(self) -> None:
        active = sum(r.state in ("queued", "running") for r in self._records.values())
        recorder().queue_depth(active, "job")


def job_runner(app_name: str, jobs: JobsSpec) -> ActorHandle[JobRunner]:
    """The app's job actor, created on first use (detached: it outlives the ingress replicas)."""
    import ray

    actor = ray.remote(JobRunner).options(
        name=f"{app_name}-jobs",
        namespace=jobs.namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,  # it only awaits other deployments
        resources={_HEAD_NODE_RESOURCE: 0.001},  # see the module docstring
        max_restarts=-1,
    )
    return cast("ActorHandle[JobRunner]", actor.remote(jobs))
