"""The job API's state and worker: one detached, named Ray actor per app.

``POST /v1/jobs`` hands the job to this actor and returns at once; the actor runs it
through the same deployments as ``/v1/segment`` (at most ``jobs.max_running`` at a time)
and keeps its record. Because the actor is detached and named, it outlives any ingress
replica: a restarted or additional ingress replica finds it by name and sees every job, and
its count of waiting jobs (``jobs.max_pending``) holds for the whole app.

With ``jobs.store`` set, every record is also kept there (``raytseg.serve.jobstore``), and
a job is recorded before ``202`` is answered. An actor that starts (the first, one that Ray
restarted, or the one of a new cluster) claims the store, loads every record and runs the
queued and interrupted jobs again; finished ones keep their records and outputs. Without a
store the records live in the actor's memory only and are gone if it dies (``GET
/v1/jobs/{id}`` then answers 404); the actor lives on the head node, as Serve's controller
does, so only a head-node loss or an upgrade to a new cluster loses them.

A job whose run failed because a replica went away (its node was lost, or it restarted) or
a stage was full is run again from the start, a few times, within ``request_timeout_s``.
Its input is still where it was and each run writes the whole output again (each file in
one PUT or rename), so a rerun replaces whatever an interrupted run left. A job is
committed once: only the store's current owner writes its final record.

Inputs are read and outputs written by the CPU stages, through fsspec; this actor only
holds small records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raytseg.errors import (
    IdempotencyConflictError,
    InputError,
    OverloadedError,
    RaytsegError,
    ReplicaUnavailableError,
    StorageError,
    StorageUnavailableError,
)
from raytseg.metrics import recorder
from raytseg.pipeline.records import OutputOptions, SegmentOptions
from raytseg.pipeline.tools import ToolRequest, run_label
from raytseg.serve import jobcommit
from raytseg.serve.config import JobsSpec, ServeConfig
from raytseg.serve.errors import as_raytseg_error
from raytseg.serve.flow import Flow, StageNames
from raytseg.serve.handoff import Delivered, Delivery
from raytseg.serve.jobcommit import Commit, Staging, moves_of, placed
from raytseg.serve.jobstore import JobStore
from raytseg.serve.runtime import HEAD_NODE_RESOURCE, Catalogue

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)
JobState = Literal["queued", "running", "succeeded", "failed"]
Public = dict[str, Any]  # a record as GET /v1/jobs/{id} answers it

# Runs of a job that meets a lost replica, a full stage or storage that does not answer. A
# lost node is noticed by the cluster within tens of seconds, so the delays between runs
# grow to cover that (5 + 10 + 20 s).
_MAX_RUNS = 4
_RETRY_DELAY_S = 5.0
_RETRY_ON = (ReplicaUnavailableError, OverloadedError, StorageUnavailableError)
_KEY_CHARACTERS = frozenset(chr(c) for c in range(0x21, 0x7F))  # printable ASCII, no space
MAX_KEY_LENGTH = 255


class JobSpec(BaseModel):
    """A validated job: normalised locations and segmentation options, or a tool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    output: str
    options: SegmentOptions = SegmentOptions()
    files: OutputOptions = OutputOptions(ml=True)
    tool: ToolRequest | None = None  # a classifier tool instead of a segmentation

    @property
    def label(self) -> str:
        """What the job runs: the task, or the tool's name (its metrics' task tag)."""
        return run_label(self.options.task, self.tool)


@dataclass(frozen=True)
class Route:
    """How to reach the app's stages and which tasks it serves (sent with each job)."""

    names: StageNames
    config: ServeConfig

    @property
    def fingerprint(self) -> str:
        text = f"{self.names}|{self.config.model_dump_json()}"
        return hashlib.sha256(text.encode()).hexdigest()


class JobRecord(BaseModel):
    """What ``GET /v1/jobs/{id}`` reports (``public``), and what the job store keeps (all)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    spec: JobSpec
    state: JobState = "queued"
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    outputs: tuple[str, ...] = ()
    error: dict[str, Any] | None = None
    device: str = "cpu"  # where the app's models run, for the run report
    report: dict[str, Any] | None = None  # raytseg.pipeline.report, once succeeded
    answer: dict[str, Any] | None = None  # a tool's JSON, once succeeded
    key: str | None = None  # the digest of the client's Idempotency-Key

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "task": self.spec.label,
            "tool": None if self.spec.tool is None else self.spec.tool.name,
            "input_uri": self.spec.input,
            "output_uri": self.spec.output,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "outputs": list(self.outputs),
            "error": self.error,
            "report": self.report,
            "answer": self.answer,
        }

    def outcome(self, delivered: Delivered) -> dict[str, Any]:
        """What the record says once ``delivered`` (its files in place) is committed: the
        outputs, and a tool's answer or the run report."""
        from raytseg.pipeline.report import ReportedRun, run_report

        if self.spec.tool is not None:
            return {"outputs": delivered.written, "answer": json.loads(delivered.body or b"null")}
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
            task_choice=delivered.task_choice,
            backends=delivered.backends,
        )
        return {"outputs": delivered.written, "report": run_report(run)}

    def committed(self, commit: Commit) -> None:
        """The job succeeded with the outputs of the run ``commit`` names."""
        self.state, self.outputs = "succeeded", commit.outputs
        self.report, self.answer = commit.report, commit.answer

    def failed(self, error: RaytsegError) -> None:
        self.state = "failed"
        self.error = {"type": type(error).__name__, "message": error.message, "status": error.status_code}

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")


def key_digest(key: str | None) -> str | None:
    """The stored form of an ``Idempotency-Key`` header (None: none sent).

    Raises:
        InputError: empty, longer than ``MAX_KEY_LENGTH`` or not printable ASCII.
    """
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_LENGTH or not set(key) <= _KEY_CHARACTERS:
        raise InputError(
            f"The Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            "without spaces (a UUID is a good key)."
        )
    return hashlib.sha256(key.encode()).hexdigest()


class JobRunner:
    """Async actor: accepts jobs, runs them through the app, remembers their outcome.

    Every call carries the app's ``Route``: the first one (an ingress replica's ``attach``
    at its start, or any request) opens the job store and runs again what it holds.
    """

    def __init__(self, jobs: JobsSpec, app: str) -> None:
        self._spec = jobs
        self._store = JobStore(jobs.store, app) if jobs.store else None
        self._claim = 0  # this actor's owner number in the store
        self._fenced = False  # a newer actor owns the store's jobs
        self._draining = False  # the service is shutting down: start no more jobs
        self._opened = False
        self._opening = asyncio.Lock()
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self._keys: dict[str, str] = {}  # Idempotency-Key digest -> job id
        self._running = asyncio.Semaphore(jobs.max_running)
        self._flows: dict[str, Flow] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def attach(self, route: Route) -> None:
        """Open the job store (once), running again the jobs it holds unfinished."""
        await self._open(route)

    async def submit(self, spec: JobSpec, route: Route, key: str | None = None) -> tuple[Public, bool]:
        """Queue a job: (its record, whether ``key`` named an earlier job, answered instead).

        Raises:
            OverloadedError: ``max_pending`` jobs wait already.
            IdempotencyConflictError: ``key`` named an earlier job with another request.
            StorageError: the job could not be recorded (nothing was queued).
        """
        await self._open(route)
        if key is not None and key in self._keys:
            return self._replayed(key, spec), True
        waiting = sum(r.state == "queued" for r in self._records.values())
        if waiting >= self._spec.max_pending:
            raise OverloadedError(f"{waiting} jobs are waiting already. Retry after the Retry-After delay.")
        from raytseg.pipeline.report import device_name

        record = JobRecord(spec=spec, device=device_name(route.config.device), key=key)
        await self._record_new(record)
        self._records[record.id] = record
        if key is not None:
            self._keys[key] = record.id
        self._start(record, route)
        return record.public(), False

    async def status(self, job_id: str, route: Route) -> dict[str, Any] | None:
        await self._open(route)
        if self._fenced and self._store is not None:  # the newer owner's records are current
            stored = await asyncio.to_thread(self._store.record, job_id)
            return None if stored is None else JobRecord.model_validate_json(stored).public()
        record = self._records.get(job_id)
        return None if record is None else record.public()

    async def drain(self) -> int:
        """Start no more jobs (queued ones stay queued: in the store, the next start runs
        them); answers how many are still running."""
        if not self._draining and self._store is None:
            queued = sum(r.state == "queued" for r in self._records.values())
            if queued:
                log.warning("%d queued jobs will not run: without jobs.store they end here.", queued)
        self._draining = True
        return sum(r.state == "running" for r in self._records.values())

    async def _open(self, route: Route) -> None:
        if self._opened:
            return
        async with self._opening:
            if not self._opened and self._store is not None:
                await self._recover(self._store, route)
            self._opened = True

    async def _recover(self, store: JobStore, route: Route) -> None:
        """Claim the store, load its records, and run again the queued and interrupted jobs."""
        self._claim = await asyncio.to_thread(store.claim)
        stored = await asyncio.to_thread(store.records)
        records = sorted(_parsed(stored), key=lambda r: r.created_at)
        for record in records:
            self._records[record.id] = record
            if record.key is not None:
                self._keys[record.key] = record.id
        again = [r for r in records if not r.finished]
        for record in again:
            record.state, record.started_at = "queued", None
            self._start(record, route)
        log.info("Job store claimed (owner %d): %d records, %d to run", self._claim, len(records), len(again))
        self._forget_old()
        self._report_depth()

    def _replayed(self, key: str, spec: JobSpec) -> dict[str, Any]:
        record = self._records[self._keys[key]]
        if record.spec != spec:
            raise IdempotencyConflictError(
                f"This Idempotency-Key was sent before for job {record.id}, with another request. "
                "Send a new key for a new job, or the same request to get that job again."
            )
        return record.public()

    def _start(self, record: JobRecord, route: Route) -> None:
        self._spawn(self._run(record, self._flow(route), route.config.request_timeout_s))
        self._report_depth()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # keep a reference until done, or the loop may drop it
        task.add_done_callback(self._tasks.discard)

    def _flow(self, route: Route) -> Flow:
        key = route.fingerprint
        if key not in self._flows:
            self._flows[key] = Flow(route.names.handles(), Catalogue(route.config))
        return self._flows[key]

    async def _run(self, record: JobRecord, flow: Flow, timeout_s: float) -> None:
        async with self._running:
            if self._draining or not await self._owned():
                return  # left queued for the next start, or the store's newer owner runs it
            record.state, record.started_at = "running", time.time()
            await self._save(record)
            self._report_depth()
            task = record.spec.label
            try:
                commit = await asyncio.wait_for(self._runs(record, flow), timeout_s)
            except Exception as exc:
                self._failed(record, as_raytseg_error(exc))
            else:
                record.committed(commit)
                recorder().request(task, "ok", "job")
            finally:
                record.finished_at = time.time()
                recorder().stage(task, "end_to_end", record.finished_at - (record.started_at or 0), "job")
                if await self._owned():  # committed once: by the store's current owner only
                    await self._save(record)
                self._forget_old()
                self._report_depth()

    async def _runs(self, record: JobRecord, flow: Flow) -> Commit:
        """Run the job, again after a lost replica, a full stage or a storage outage."""
        for run in range(1, _MAX_RUNS + 1):
            try:
                return await self._run_once(record, flow)
            except _RETRY_ON as exc:
                if run == _MAX_RUNS:
                    raise
                delay = _RETRY_DELAY_S * 2 ** (run - 1)
                log.warning("Job %s: %s; running it again in %.0f s", record.id, type(exc).__name__, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last run returns or raises")

    async def _run_once(self, record: JobRecord, flow: Flow) -> Commit:
        """One run into its own staging, then its commit; or, if a run of the job was
        committed before (an earlier actor's, or one cut short), that commit completed."""
        held = await self._held(record.id)
        if held is None:
            spec = record.spec
            staging = Staging.new(record.id, spec.output, None if spec.tool is not None else spec.files)
            delivered = await _deliver(spec, flow, staging)
            outcome = record.outcome(placed(staging, delivered))
            mine = Commit(staging=staging, moves=moves_of(staging, delivered.written), **outcome)
            held = await self._hold(record.id, mine)
        await asyncio.to_thread(jobcommit.finish, held)
        return held

    async def _held(self, job_id: str) -> Commit | None:
        if self._store is None:
            return None
        stored = await asyncio.to_thread(self._store.commit, job_id)
        return None if stored is None else Commit.model_validate_json(stored)

    async def _hold(self, job_id: str, mine: Commit) -> Commit:
        """The job's commit: ``mine``, unless the store holds an earlier run's (whose files
        are then the job's; this run's are dropped)."""
        if self._store is None:
            return mine
        stored = await asyncio.to_thread(self._store.hold_commit, job_id, mine.model_dump_json().encode())
        held = Commit.model_validate_json(stored)
        if held.staging != mine.staging:
            log.warning("Job %s: another run's outputs were committed first; this run's are dropped", job_id)
            await asyncio.to_thread(jobcommit.drop, mine.staging)
        return held

    def _failed(self, record: JobRecord, error: RaytsegError) -> None:
        record.failed(error)
        recorder().request(record.spec.label, "failed", "job")
        recorder().error(record.spec.label, type(error).__name__, "job")
        log.warning("Job %s failed: %s", record.id, type(error).__name__)

    async def _record_new(self, record: JobRecord) -> None:
        """Store a new job's record before it is acknowledged; errors reach the client."""
        if self._store is None:
            return
        if not await self._check_owner(self._store):
            raise ReplicaUnavailableError(
                "This job service is being replaced by a newer one. Retry after the Retry-After delay."
            )
        await self._write(self._store, record)

    async def _owned(self) -> bool:
        """Whether this actor still owns the store's jobs (True without a store, or while
        the store does not answer: an outage must not stall the jobs)."""
        if self._store is None:
            return True
        try:
            return await self._check_owner(self._store)
        except StorageError as exc:
            log.warning("%s", exc)
            return True

    async def _check_owner(self, store: JobStore) -> bool:
        """Whether no newer actor has claimed the store (``_fenced`` follows the answer)."""
        owned = await asyncio.to_thread(store.is_owner, self._claim)
        if not owned and not self._fenced:
            log.warning("A newer job actor owns the job store: this one starts and commits no more jobs.")
        self._fenced = not owned
        return owned

    async def _save(self, record: JobRecord) -> None:
        """Store a record's new state; if the store fails, the job goes on (a restart reruns it)."""
        if self._store is None:
            return
        try:
            await self._write(self._store, record)
        except StorageError as exc:
            log.warning("Job %s: %s", record.id, exc)

    @staticmethod
    async def _write(store: JobStore, record: JobRecord) -> None:
        await asyncio.to_thread(store.save, record.id, record.model_dump_json().encode())

    def _forget_old(self) -> None:
        finished = [k for k, r in self._records.items() if r.finished]
        old = finished[: max(0, len(finished) - self._spec.keep_finished)]
        for key in old:
            record = self._records.pop(key)
            self._keys.pop(record.key or "", None)
        if old and self._store is not None:
            self._spawn(self._delete(self._store, old))

    async def _delete(self, store: JobStore, job_ids: list[str]) -> None:
        try:
            await asyncio.to_thread(store.forget, job_ids)
        except StorageError as exc:  # kept in the store; the next owner forgets them again
            log.warning("%s", exc)

    def _report_depth(self) -> None:
        active = sum(not r.finished for r in self._records.values())
        recorder().queue_depth(active, "job")


async def _deliver(spec: JobSpec, flow: Flow, staging: Staging) -> Delivered:
    """The job's run, its files written into ``staging`` (removed again if the run fails)."""
    try:
        if spec.tool is not None:
            return await flow.answer_to(spec.input, spec.tool, staging.output, "job")
        return await flow.segment(spec.input, spec.options, Delivery(spec.files, staging.output), "job")
    except Exception:
        await asyncio.to_thread(jobcommit.drop, staging)
        raise


def _parsed(stored: list[bytes]) -> list[JobRecord]:
    """The readable records; one that is not (another raytseg version's) is left alone."""
    records = []
    for data in stored:
        try:
            records.append(JobRecord.model_validate_json(data))
        except ValidationError as exc:
            log.warning("A job record could not be read and is skipped: %s", exc)
    return records


def job_runner(app_name: str, jobs: JobsSpec) -> ActorHandle[JobRunner]:
    """The app's job actor, created on first use (detached: it outlives the ingress replicas)."""
    import ray

    actor = ray.remote(JobRunner).options(
        name=f"{app_name}-jobs",
        namespace=jobs.namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,  # it only awaits other deployments
        resources={HEAD_NODE_RESOURCE: 0.001},  # see the module docstring
        max_restarts=-1,
    )
    return cast("ActorHandle[JobRunner]", actor.remote(jobs, app_name))
