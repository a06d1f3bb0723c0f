"""The HTTP ingress: routes, auth, limits and validation; the one place errors become HTTP.

    POST /v1/segment        image in the body -> multilabel NIfTI, or a zip (per-class / statistics)
    POST /v1/modality       image in the body -> {"modality": "ct" | "mr", "probability"} (get-modality)
    POST /v1/phase          CT in the body -> {"pi_time", "phase", ...} (get-phase)
    POST /v1/jobs           {input_uri, output_uri, task, options} -> 202 {id, state, ...}
                            (Idempotency-Key: the same key answers the same job)
    GET  /v1/jobs/{id}      state, written locations, error
    GET  /v1/tasks          catalogue tasks, classes, what this deployment serves
    GET  /healthz           this replica answers
    GET  /readyz            every deployment has a running replica (models loaded)
    GET  /docs              OpenAPI UI (/openapi.json)

Routes are ``async`` and hold no arrays: the image bytes go to the preprocess stage as
they were uploaded and the answer comes back from the postprocess stage as bytes.
"""

# No ``from __future__ import annotations`` here: Serve pickles the routes by value, and
# FastAPI must read their parameter types from real objects, not from names to resolve.

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from raytseg import __version__
from raytseg.config import environment
from raytseg.errors import (
    ImageTooLargeError,
    JobNotFoundError,
    NotDeployedError,
    OverloadedError,
    RaytsegError,
    ReplicaUnavailableError,
    UnreadableImageError,
)
from raytseg.metrics import recorder
from raytseg.pipeline.tools import MODALITY_TOOL, PHASE_TOOL, ToolRequest, check_answer_location
from raytseg.serve.config import LimitsSpec, ServeConfig
from raytseg.serve.errors import FAILED_STATES, as_raytseg_error, http_error, startup_error
from raytseg.serve.flow import Flow, StageNames, Stages
from raytseg.serve.handoff import Delivery, Entrypoint
from raytseg.serve.jobs import JobSpec, Route, job_runner, key_digest
from raytseg.serve.runtime import Catalogue
from raytseg.serve.schemas import ErrorBody, JobRequest, JobStatus, SegmentQuery, TaskInfo
from raytseg.serve.security import UriPolicy, check_bearer, load_tokens
from raytseg.tasks import load_catalog

log = logging.getLogger(__name__)
T = TypeVar("T")
_READY_TTL_S = 2.0
# What task=auto ran on a synchronous request, and why (its report holds the same).
TASK_HEADER, TASK_REASON_HEADER = "X-Raytseg-Task", "X-Raytseg-Task-Reason"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503, 504)
}

# The upload routes' body (read from the stream, so FastAPI cannot describe it itself).
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "A NIfTI file (.nii or .nii.gz) or a zip of one DICOM series.",
    }
}
_JSON_ANSWER: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {}}}}

api = FastAPI(
    title="raytseg",
    version=__version__,
    description="TotalSegmentator-compatible CT/MR segmentation. Authenticate with "
    "'Authorization: Bearer <token>' when the service has tokens configured.",
    responses=_ERRORS,
)


@api.exception_handler(RaytsegError)
async def _raytseg_error(request: Request, error: RaytsegError) -> JSONResponse:
    limits: LimitsSpec = getattr(request.app.state, "limits", LimitsSpec())
    answer = http_error(error, overload_status=limits.overload_status, retry_after_s=limits.retry_after_s)
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the input values; name the fields and the problems only.
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    body = {"error": {"type": "InvalidOptionError", "message": problems, "status": 422}}
    return JSONResponse(body, status_code=422)


class Admission:
    """Counts the segmentations this replica holds and refuses past the limit, or all of
    them once the service is shutting down (``draining``)."""

    def __init__(self, limit: int, entrypoint: Entrypoint = "http") -> None:
        self.limit = limit
        self.held = 0
        self.draining = False
        self._entrypoint = entrypoint

    def check_open(self) -> None:
        if self.draining:
            raise ReplicaUnavailableError(
                "The service is shutting down. Retry after the Retry-After delay: another replica "
                "or the restarted service will answer."
            )

    @contextmanager
    def slot(self) -> Iterator[None]:
        self.check_open()
        if self.held >= self.limit:
            raise OverloadedError(f"{self.held} segmentations in progress; retry after Retry-After seconds.")
        self.held += 1
        recorder().queue_depth(self.held, self._entrypoint)
        try:
            yield
        finally:
            self.held -= 1
            recorder().queue_depth(self.held, self._entrypoint)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageTooLargeError(f"The upload has {declared} bytes, more than the limit of {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ImageTooLargeError(f"The upload passed the limit of {limit} bytes.")
        chunks.append(chunk)
    if size == 0:
        raise UnreadableImageError("The request body is empty. Send a NIfTI file or a DICOM zip.")
    return b"".join(chunks)


def _task_tag(task: str) -> str:
    """A metric tag for a task: catalogue names and the tools only, so clients cannot add label values."""
    return task if task in load_catalog().tasks or task in (MODALITY_TOOL, PHASE_TOOL) else "unknown"


def _readiness(app: str) -> dict[str, Any]:
    return readiness(serve.status().applications.get(app))


def readiness(status: Any) -> dict[str, Any]:
    """``/readyz``'s answer from Serve's status of the app (None: not deployed yet).

    A deployment scaled to zero on purpose is HEALTHY without replicas; every other one
    needs a running replica, and a model replica runs only once its network is loaded. A
    deployment whose replicas fail to start is named in ``failed`` with the raytseg error
    that stopped them (its class only: this route answers without a token, so no paths or
    messages from the replicas).
    """
    if status is None:
        return {"ready": False, "waiting_for": ["application"]}
    waiting, failed = [], {}
    for name, deployment in status.deployments.items():
        if deployment.replica_states.get("RUNNING", 0) < 1 and deployment.status != "HEALTHY":
            waiting.append(name)
        if deployment.status in FAILED_STATES:
            failed[name] = startup_error(deployment.message)
    answer = {"ready": not waiting, "status": str(status.status.value), "waiting_for": sorted(waiting)}
    return {**answer, "failed": failed} if failed else answer


# ``serve.ingress`` pickles the FastAPI app (routes included) when the class is decorated,
# so everything the routes call must be defined above this point.
@serve.ingress(api)
class Ingress:
    """FastAPI ingress deployment; holds handles to the other deployments."""

    def __init__(  # noqa: PLR0913 - the bound deployments arrive as constructor arguments
        self,
        config: ServeConfig,
        preprocess: DeploymentHandle[Any],
        postprocess: DeploymentHandle[Any],
        models: Mapping[str, DeploymentHandle[Any]],
        pool: DeploymentHandle[Any] | None,
    ) -> None:
        self._config = config
        self._tokens = load_tokens(config.auth, environment())
        if not self._tokens:
            log.warning("No API tokens configured: anyone who reaches the service can use it.")
        self._catalogue = Catalogue(config)
        self._flow = Flow(Stages(preprocess, postprocess, dict(models), pool), self._catalogue)
        self._admission = Admission(config.admitted_per_ingress)
        self._uris = UriPolicy(config.jobs.allowed_prefixes)
        self._app = serve.get_replica_context().app_name
        self._route = Route(StageNames(self._app, tuple(models), pool is not None), config)
        self._runner = job_runner(self._app, config.jobs) if config.jobs.enabled else None
        self._attach()
        self._ready: tuple[float, dict[str, Any]] = (0.0, {})
        api.state.limits = config.limits

    @api.post(
        "/v1/segment",
        response_class=Response,
        responses={
            200: {"content": {"application/gzip": {}, "application/dicom": {}, "application/zip": {}}}
        },
        openapi_extra=_IMAGE_BODY,
    )
    async def segment(self, request: Request, query: Annotated[SegmentQuery, Query()]) -> Response:
        """Segment the uploaded image.

        Answers the multilabel NIfTI (label table in its header) when ``ml`` is true and no
        statistics are asked for; otherwise a zip with what TotalSegmentator writes to its
        output folder: ``segmentation.nii.gz`` or one ``<class>.nii.gz`` per class, plus
        ``statistics.json`` when ``statistics`` is true and ``preview_<task>.png`` with ``preview``.
        With ``task=auto``, the headers ``X-Raytseg-Task`` and ``X-Raytseg-Task-Reason`` say
        what ran and why.
        """
        with self._tracked(query.task_name, "http"):
            self._authorize(request)
            options, delivery = query.segment(), Delivery(query.output())
            self._flow.check(options, output=delivery.files)
            done = await self._on_upload(
                request, lambda body: self._flow.segment(body, options, delivery, "http")
            )
        headers = {"Content-Disposition": f'attachment; filename="{done.filename}"'}
        if done.task_choice is not None:
            headers |= {TASK_HEADER: done.task_choice.task, TASK_REASON_HEADER: done.task_choice.reason}
        return Response(done.body, media_type=done.media_type, headers=headers)

    @api.post("/v1/modality", response_class=Response, responses=_JSON_ANSWER, openapi_extra=_IMAGE_BODY)
    async def modality(self, request: Request, normalized_intensities: bool = False) -> Response:
        """CT or MR? ``totalseg_get_modality``'s JSON, byte for byte: the intensity
        classifier, or with ``normalized_intensities`` (its ``-n``) the ROI-based one, which
        segments with ``total_mr`` fast (served here or 503)."""
        return await self._tool(
            request, ToolRequest(name=MODALITY_TOOL, normalized_intensities=normalized_intensities)
        )

    @api.post("/v1/phase", response_class=Response, responses=_JSON_ANSWER, openapi_extra=_IMAGE_BODY)
    async def phase(self, request: Request) -> Response:
        """The contrast phase of a CT: ``totalseg_get_phase``'s JSON, byte for byte. Segments
        with ``total`` fast, and with ``headneck_bones_vessels`` when the image holds a head
        (each served here, or 503)."""
        return await self._tool(request, ToolRequest(name=PHASE_TOOL))

    async def _tool(self, request: Request, tool: ToolRequest) -> Response:
        with self._tracked(tool.name, "http"):
            self._authorize(request)
            self._flow.check_tool(tool)
            answer = await self._on_upload(request, lambda body: self._flow.answer(body, tool, "http"))
        return Response(answer, media_type="application/json")

    @api.post("/v1/jobs", status_code=202, response_model=JobStatus)
    async def submit_job(
        self,
        request: Request,
        job: Annotated[JobRequest, Body()],
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        """Queue a segmentation of ``input_uri``, written under ``output_uri``, or with
        ``tool`` a classifier tool, its JSON answer written to ``output_uri``; poll
        ``/v1/jobs/{id}``.

        With an ``Idempotency-Key`` header, a request sent again with the same key (after a
        lost answer, a timeout) gets the job the first one made, with ``Idempotent-Replayed:
        true``; the same key with another request is refused (409).
        """
        self._authorize(request)
        self._admission.check_open()
        key = key_digest(idempotency_key)
        spec = self._job_spec(job)
        record, replayed = await self._call_runner("submit", spec, self._route, key)
        headers = {"Location": f"/v1/jobs/{record['id']}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(record, status_code=202, headers=headers)

    def _job_spec(self, job: JobRequest) -> JobSpec:
        """The job as it will run, refused (4xx) if this service cannot run it or a location
        is outside the allow-list."""
        if job.tool is not None:
            self._flow.check_tool(job.tool)
            check_answer_location(job.tool, job.output_uri)
            source, target = self._locations(job)
            return JobSpec(input=source, output=target, tool=job.tool)
        options, output = job.options.segment(task=job.task), job.options.output()
        self._flow.check(options, output=output)
        if output.dicomweb_store is not None:  # a server the job would send data to
            self._uris.check(output.dicomweb_store, "dicomweb_store")
        source, target = self._locations(job)
        return JobSpec(input=source, output=target, options=options, files=output)

    def _locations(self, job: JobRequest) -> tuple[str, str]:
        return self._uris.check(job.input_uri, "input_uri"), self._uris.check(job.output_uri, "output_uri")

    @api.get("/v1/jobs/{job_id}", response_model=JobStatus)
    async def job_status(self, request: Request, job_id: str) -> dict[str, Any]:
        """State of a job; ``outputs`` lists the written locations once it succeeded."""
        self._authorize(request)
        record: dict[str, Any] | None = await self._call_runner("status", job_id, self._route)
        if record is None:
            raise JobNotFoundError(f"No job {job_id!r} (unknown, or forgotten after newer jobs).")
        return record

    @api.get("/v1/tasks", response_model=list[TaskInfo])
    async def tasks(self, request: Request) -> list[dict[str, Any]]:
        """Every catalogue task with its classes, and which modes this deployment serves."""
        self._authorize(request)
        served = self._config.tasks
        return [
            {
                "name": name,
                "modality": task.modality,
                "license_required": task.license_required,
                "modes": sorted(task.modes),
                "classes": task.classes,
                "served_modes": list(served[name].modes) if name in served else [],
                "dedicated": served[name].dedicated if name in served else False,
            }
            for name, task in load_catalog().tasks.items()
        ]

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: this ingress replica answers."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 once every deployment of the app has a running replica (models loaded)."""
        if self._admission.draining:
            return JSONResponse({"ready": False, "waiting_for": [], "draining": True}, status_code=503)
        checked, report = self._ready
        if time.monotonic() - checked > _READY_TTL_S:
            report = await asyncio.to_thread(_readiness, self._app)
            self._ready = (time.monotonic(), report)
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    async def drain(self) -> tuple[str, int]:
        """Refuse every new request from now on (503, ``/readyz`` too); answers (this
        replica's id, segmentations it still holds). ``raytseg serve`` calls it through the
        app's handle on SIGTERM, until every ingress replica holds none."""
        self._admission.draining = True
        return serve.get_replica_context().replica_id.unique_id, self._admission.held

    def check_health(self) -> None:
        """Serve calls this every few seconds: it also wakes a job actor that Ray restarted,
        which then runs again the jobs its store holds unfinished."""
        self._attach()

    def _attach(self) -> None:
        if self._runner is not None:  # not awaited: an unreachable job actor is not this replica's fault
            self._runner.attach.remote(self._route)

    async def _on_upload(self, request: Request, work: Callable[[bytes], Awaitable[T]]) -> T:
        """``work`` on the request's body: admitted, size-limited, under the request timeout."""
        with self._admission.slot():
            body = await read_body(request, self._config.limits.max_body_bytes)
            return await asyncio.wait_for(work(body), self._config.request_timeout_s)

    def _authorize(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self._tokens)

    async def _call_runner(self, method: str, *args: Any) -> Any:
        if self._runner is None:
            raise NotDeployedError("The job API is disabled on this service (jobs.enabled).")
        try:
            return await getattr(self._runner, method).remote(*args)
        except Exception as exc:
            error = as_raytseg_error(exc)
            if error.status_code == 503 and not isinstance(error, OverloadedError):
                # The job actor was lost for good: the next call creates a new one.
                self._runner = job_runner(self._app, self._config.jobs)
            raise error from exc

    @contextmanager
    def _tracked(self, task: str, entrypoint: Entrypoint) -> Iterator[None]:
        """Request metrics, and every failure turned into a member of the error tree."""
        tag, started = _task_tag(task), time.perf_counter()
        try:
            yield
        except Exception as exc:
            error = as_raytseg_error(exc)
            if error.status_code >= 500 and not isinstance(error, OverloadedError):
                log.error("Request failed: %s", type(error).__name__, exc_info=exc)
            recorder().request(tag, "failed", entrypoint)
            recorder().error(tag, type(error).__name__, entrypoint)
            raise error from exc
        recorder().request(tag, "ok", entrypoint)
        recorder().stage(tag, "end_to_end", time.perf_counter() - started, entrypoint)
