"""Routing one segmentation through the deployments; shared by the HTTP routes and the job runner.

The flow is ``raytseg.pipeline.run.Segmenter``'s loop spread over replicas: the same
admission, the same passes in the same order, ``after_pass`` (in ``end_pass``) between
them, the same steps. Each call takes
the earlier calls' responses as arguments; the flow waits until a call has finished (its
result exists) before making the next, but never fetches an intermediate result: the
arrays go from replica to replica (``raytseg.serve.handoff``), and only the final answer
comes here. The model calls of a pass need only the preprocessing result and are sent
together, so the parts of ``total`` run at the same time on their own replicas.

Failures leave the flow as members of the error tree (``as_raytseg_error``), after every
call still pending was cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from raytseg.errors import ModelUnavailableError, NotDeployedError, ReplicaUnavailableError
from raytseg.pipeline.export import check_model_grid
from raytseg.pipeline.modality import ROI_SEGMENTATION, ModalityGuess, choose_task
from raytseg.pipeline.phase import BODY_SEGMENTATION, NECK_SEGMENTATION, PhaseGuess, Stats, neck_needed
from raytseg.pipeline.plan import AUTO_TASK, Admitted, Pass, check_candidates, for_modality
from raytseg.pipeline.preprocess import model_key
from raytseg.pipeline.records import OutputOptions, SegmentOptions, TaskChoice
from raytseg.pipeline.tools import MODALITY_TOOL, PHASE_TOOL, ToolRequest
from raytseg.serve.errors import FAILED_STATES, as_raytseg_error, startup_error
from raytseg.serve.handoff import Delivered, Delivery, Entrypoint, Tags
from raytseg.serve.runtime import POOL, POSTPROCESS, PREPROCESS, Catalogue, deployment_name
from raytseg.serve.stages import PassSpec

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponse

    Handle = DeploymentHandle[Any]
    Response = DeploymentResponse[Any]

log = logging.getLogger(__name__)
T = TypeVar("T")
# How often a waiting request looks for lost nodes, and how long it then still waits.
_NODE_CHECK_S = 5.0
_NODE_LOSS_GRACE_S = 30.0


@dataclass(frozen=True)
class Stages:
    """Handles to the deployments a segmentation goes through."""

    preprocess: Handle
    postprocess: Handle
    models: Mapping[str, Handle]  # model_key -> its own deployment
    pool: Handle | None  # every other model, multiplexed by model_key


@dataclass(frozen=True)
class StageNames:
    """Where the stages of an app are, by name: enough to rebuild ``Stages`` in another actor."""

    app: str
    models: tuple[str, ...]  # model keys with a deployment of their own
    pool: bool

    def handles(self) -> Stages:
        from ray import serve

        def get(name: str) -> Handle:
            return serve.get_deployment_handle(name, self.app)

        models = {key: get(deployment_name(key)) for key in self.models}
        return Stages(get(PREPROCESS), get(POSTPROCESS), models, get(POOL) if self.pool else None)


class Flow:
    """Runs segmentations through ``Stages`` for the tasks ``catalogue`` serves."""

    def __init__(self, stages: Stages, catalogue: Catalogue) -> None:
        self._stages = _by_reference(stages)
        self._catalogue = catalogue

    def check(self, options: SegmentOptions, output: OutputOptions | None = None) -> None:
        """Refuse (4xx) before any image is read a request that is invalid, unlicensed, not
        served, or asks for outputs its options cannot give (task auto: either way it may go)."""
        if output is not None:
            check_model_grid(options, output)
        check_candidates(options, self._admit)

    def check_tool(self, tool: ToolRequest) -> None:
        """Refuse before any image is read a tool whose segmentations are not served here."""
        for options in tool.segmentations:
            self.check(options)

    def _admit(self, options: SegmentOptions, modality: str | None = None) -> Admitted:
        admitted = self._catalogue.admit(options, modality)
        for spec in admitted.plan.all_models:
            self._model(model_key(spec))
        return admitted

    async def segment(
        self, source: bytes | str, options: SegmentOptions, delivery: Delivery, entrypoint: Entrypoint
    ) -> Delivered:
        """Segment ``source`` (upload bytes or a location) and deliver as asked.

        Raises:
            RaytsegError: any failure, translated; calls still pending are cancelled first.
        """
        self.check(options, output=delivery.files)
        return await _guarded(lambda calls: self._run(calls, source, options, delivery, entrypoint))

    async def statistics(self, source: bytes | str, options: SegmentOptions, entrypoint: Entrypoint) -> Stats:
        """Segment ``source`` (``options.statistics`` set) and answer its statistics only."""
        done = await self.segment(source, options, Delivery(statistics_only=True), entrypoint)
        assert done.statistics is not None, "options.statistics is set"
        return done.statistics

    async def answer(self, source: bytes | str, tool: ToolRequest, entrypoint: Entrypoint) -> bytes:
        """A classifier tool's JSON answer for ``source`` (``tools.answer_of`` through the
        deployments)."""
        if tool.name == PHASE_TOOL:
            return (await self._phase(source, entrypoint)).to_json()
        return (await self._modality(source, tool.normalized_intensities, entrypoint)).to_json()

    async def answer_to(
        self, source: str, tool: ToolRequest, output: str, entrypoint: Entrypoint
    ) -> Delivered:
        """A tool job: its answer written to ``output``, one JSON file written whole."""
        from raytseg.storage import base_name, write_bytes

        answer = await self.answer(source, tool, entrypoint)
        await asyncio.to_thread(write_bytes, output, answer)
        return Delivered(answer, "application/json", base_name(output), written=(output,), task=tool.name)

    async def _modality(self, source: bytes | str, normalized: bool, entrypoint: Entrypoint) -> ModalityGuess:
        """``get-modality``: the intensity classifier, or with ``normalized`` the ROI one."""
        preprocess = self._stages.preprocess
        if normalized:
            statistics = await self.statistics(source, ROI_SEGMENTATION, entrypoint)
            return cast(ModalityGuess, await preprocess.roi_modality.remote(statistics))

        async def classify(calls: _Calls) -> ModalityGuess:
            volume = calls.add(
                preprocess.load.remote(source, Tags(MODALITY_TOOL, entrypoint), OutputOptions())
            )
            guess = await calls.watched(calls.add(preprocess.classify_modality.remote(volume)))
            return cast(ModalityGuess, guess)

        return await _guarded(classify)

    async def _phase(self, source: bytes | str, entrypoint: Entrypoint) -> PhaseGuess:
        """``get-phase``: the body's statistics, the neck's when the image holds a head, the regressors."""
        body = await self.statistics(source, BODY_SEGMENTATION, entrypoint)
        neck = await self.statistics(source, NECK_SEGMENTATION, entrypoint) if neck_needed(body) else None
        return cast(PhaseGuess, await self._stages.preprocess.phase.remote(body, neck))

    async def _run(  # noqa: PLR0913 - segment()'s arguments plus the call tracker
        self,
        calls: _Calls,
        source: bytes | str,
        options: SegmentOptions,
        delivery: Delivery,
        entry: Entrypoint,
    ) -> Delivered:
        load = self._stages.preprocess.load.remote(source, Tags(options.task, entry), delivery.files)
        volume = await calls.finished(load)
        admitted, choice = await self._admit_loaded(calls, options, volume, entry)
        delivered = await self._passes(calls, volume, admitted, delivery, entry)
        return delivered if choice is None else dataclasses.replace(delivered, task_choice=choice)

    async def _passes(  # noqa: PLR0913 - _run()'s, with the loaded image and its admission
        self, calls: _Calls, volume: Response, admitted: Admitted, delivery: Delivery, entry: Entrypoint
    ) -> Delivered:
        """The admitted passes over the loaded image, delivered as asked."""
        preprocess, postprocess = self._stages.preprocess, self._stages.postprocess
        before = None
        for index, step in enumerate(admitted.passes):
            tags = Tags(admitted.options.task, entry, crop_pass=not step.is_main)
            spec = PassSpec(admitted.passes, index, tags, delivery)
            prepared = await calls.finished(preprocess.prepare.remote(spec, volume, before))
            outputs = await self._predict(calls, step, prepared, tags)
            if step.is_main:
                finish = postprocess.finish.remote(spec, volume, prepared, before, *outputs)
                return cast(Delivered, await calls.watched(calls.add(finish)))
            before = await calls.finished(
                postprocess.end_pass.remote(spec, volume, prepared, before, *outputs)
            )
        raise AssertionError("the main pass always ends the run")

    async def _admit_loaded(
        self, calls: _Calls, options: SegmentOptions, volume: Response, entry: Entrypoint
    ) -> tuple[Admitted, TaskChoice | None]:
        """The request admitted for the loaded image: task auto's choice, or the MR rule
        (whose modality is asked of the image only when the rule could apply)."""
        if options.task == AUTO_TASK:
            choice = await self._choose_task(calls, volume, entry)
            return self._admit(options, choice.modality), choice
        if for_modality(options, "MR") == options:
            return self._admit(options), None
        modality = await calls.watched(calls.add(self._stages.preprocess.modality.remote(volume)))
        return self._admit(options, modality), None

    async def _choose_task(self, calls: _Calls, volume: Response, entry: Entrypoint) -> TaskChoice:
        """``choose_task`` on the loaded image; the ROI classifier's segmentation, when
        needed, runs through the same deployments."""
        preprocess = self._stages.preprocess
        evidence = await calls.watched(calls.add(preprocess.modality_evidence.remote(volume)))
        roi = None
        if evidence.needs_roi:
            delivery = Delivery(statistics_only=True)
            done = await self._passes(calls, volume, self._admit(ROI_SEGMENTATION), delivery, entry)
            roi = await calls.watched(calls.add(preprocess.roi_modality.remote(done.statistics)))
        return choose_task(evidence, roi)

    async def _predict(self, calls: _Calls, step: Pass, prepared: Response, tags: Tags) -> list[Response]:
        """One call per network of the pass, all sent at once (they need only ``prepared``)."""
        handles = [self._model(model_key(m)) for m in step.plan.main.models]
        await _refuse_unstartable(handles)
        sent = [handle.predict.remote(prepared, tags) for handle in handles]
        return list(await asyncio.gather(*(calls.finished(response) for response in sent)))

    def _model(self, key: str) -> Handle:
        if key in self._stages.models:
            return self._stages.models[key]
        if self._stages.pool is None:
            raise NotDeployedError(f"Model {key} has no deployment here and the shared pool is disabled.")
        return self._stages.pool.options(multiplexed_model_id=key)


async def _guarded(work: Callable[[_Calls], Awaitable[T]]) -> T:
    """``work`` with a fresh call tracker; on any failure every call still pending is
    cancelled, and errors leave as members of the error tree."""
    calls = _Calls()
    try:
        return await work(calls)
    except asyncio.CancelledError:  # timeout or client gone: stop the work, keep cancelling
        calls.cancel()
        raise
    except Exception as exc:
        calls.cancel()
        raise as_raytseg_error(exc) from exc


class _Calls:
    """The deployment calls of one request: what to cancel on failure, and a watch for lost nodes.

    A stage result lives on the node whose replica made it. When that node is lost, a call
    that takes the result as argument can wait without end: Serve's router takes the failed
    argument for an unavailable replica and keeps retrying (Ray 2.60). So every wait here
    also watches the cluster's nodes: once a node that was alive when the request began has
    been gone for ``_NODE_LOSS_GRACE_S`` and the call still has not finished, the request
    fails with ``ReplicaUnavailableError`` (503; the job runner runs the job again). Calls
    that merely ran on the lost node fail sooner on their own, with the same error.
    """

    def __init__(self) -> None:
        self._responses: list[Response] = []
        self._nodes: frozenset[str] | None = None  # alive when the first wait began
        self._loss_seen_at: float | None = None

    def add(self, response: Any) -> Response:
        """Remember a call (``handle.method.remote(...)``) and return it."""
        self._responses.append(response)
        return cast("Response", response)

    async def finished(self, response: Any) -> Response:
        """Remember a call and wait until it has finished; returns it (not its result)."""
        await self.watched(_ready(self.add(response)))
        return cast("Response", response)

    async def watched(self, waiting: Awaitable[T]) -> T:
        """Await ``waiting``, failing if it outlives a lost node by the grace period."""
        if self._nodes is None:
            self._nodes = await asyncio.to_thread(_alive_nodes)
        task = asyncio.ensure_future(waiting)
        while True:
            done, _ = await asyncio.wait({task}, timeout=_NODE_CHECK_S)
            if done:
                return task.result()
            if await self._node_lost_long_ago():
                task.cancel()
                raise ReplicaUnavailableError(
                    "A node of the cluster was lost while this request ran. Retry it."
                )

    async def _node_lost_long_ago(self) -> bool:
        if self._loss_seen_at is None:
            gone = (self._nodes or frozenset()) - await asyncio.to_thread(_alive_nodes)
            if not gone:
                return False
            log.warning(
                "Nodes %s were lost during a request; it fails in %.0f s unless done",
                gone,
                _NODE_LOSS_GRACE_S,
            )
            self._loss_seen_at = time.monotonic()
        return time.monotonic() - self._loss_seen_at > _NODE_LOSS_GRACE_S

    def cancel(self) -> None:
        for response in self._responses:
            try:
                response.cancel()  # type: ignore[no-untyped-call]
            except Exception:  # already finished or failed: nothing to stop
                log.debug("cancel failed", exc_info=True)


_alive_cache: tuple[float, frozenset[str]] = (-_NODE_CHECK_S, frozenset())


def _alive_nodes() -> frozenset[str]:
    """IDs of the cluster's live nodes; one call to Ray's GCS per check period and process,
    however many requests are waiting."""
    global _alive_cache  # noqa: PLW0603 - a per-process cache, by design
    import ray

    checked_at, alive = _alive_cache
    if time.monotonic() - checked_at >= _NODE_CHECK_S:
        nodes = ray.nodes()  # type: ignore[no-untyped-call]
        alive = frozenset(node["NodeID"] for node in nodes if node["Alive"])
        _alive_cache = (time.monotonic(), alive)
    return alive


async def _refuse_unstartable(handles: list[Handle]) -> None:
    """Fail at once when a deployment of ``handles`` cannot start replicas: Serve would
    hold the call, without an error, until the request times out."""
    failed = await asyncio.to_thread(_failed_deployments)
    for handle in handles:
        error = failed.get((handle.app_name, handle.deployment_name))
        if error is not None:
            raise ModelUnavailableError(
                f"Deployment {handle.deployment_name}, which this request needs, cannot start its "
                f"replicas ({error}); the service's other tasks are served. Fix what stops it "
                "(missing or corrupt weights: raytseg weights download or import, where the "
                "service's `weights` setting points); /readyz lists it under 'failed', and its "
                "replica logs hold the details."
            )


_failed_cache: tuple[float, dict[tuple[str, str], str]] = (-_NODE_CHECK_S, {})


def _failed_deployments() -> dict[tuple[str, str], str]:
    """``{(app, deployment): error class}`` of the deployments without a running replica
    that Serve reports failed; one status call per check period and process."""
    global _failed_cache  # noqa: PLW0603 - a per-process cache, by design
    from ray import serve

    checked_at, failed = _failed_cache
    if time.monotonic() - checked_at >= _NODE_CHECK_S:
        failed = {
            (app, name): startup_error(deployment.message)
            for app, status in serve.status().applications.items()
            for name, deployment in status.deployments.items()
            if deployment.status in FAILED_STATES and not _running(deployment)
        }
        _failed_cache = (time.monotonic(), failed)
    return failed


def _running(deployment: Any) -> int:
    return int(deployment.replica_states.get("RUNNING", 0))


async def _ready(response: Response) -> None:
    """Wait until a call's result exists in the object store, without fetching it.

    A call waiting for its arguments counts as queued at its deployment, for the queue
    limit and for autoscaling; so each stage is called only once the previous one is done,
    or a preprocessing backlog would scale up the model replicas.
    """
    ref = await response._to_object_ref()
    # ``ObjectRef._ready`` is what Serve itself awaits before routing a call that takes a
    # response as argument; ``ray.wait`` without fetching is the public, blocking equivalent.
    ready = getattr(ref, "_ready", None)
    if ready is not None:
        await ready()
    else:
        import ray

        await asyncio.to_thread(ray.wait, [ref], fetch_local=False)


def _by_reference(stages: Stages) -> Stages:
    """Handles that pass results as object refs, whatever the Serve defaults of the process.

    Serve can send results by value (gRPC) when ``RAY_SERVE_USE_GRPC_BY_DEFAULT`` or the
    throughput-optimised mode is on; this app relies on refs: a by-value result would
    copy every network input and label map through the caller.
    """

    def ref(handle: Handle) -> Handle:
        return handle.options(_by_reference=True)

    pool = None if stages.pool is None else ref(stages.pool)
    models = {key: ref(handle) for key, handle in stages.models.items()}
    return Stages(ref(stages.preprocess), ref(stages.postprocess), models, pool)
