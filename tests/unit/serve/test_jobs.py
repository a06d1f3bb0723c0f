"""The job actor's logic without Ray: its store, recovery, fencing and idempotency keys.

The segmentation is a stand-in flow (the real one is exercised by the integration tests);
two ``JobRunner`` objects on one store folder play an actor and its successor.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from raytseg.errors import IdempotencyConflictError, InputError, ReplicaUnavailableError
from raytseg.pipeline.records import SegmentOptions
from raytseg.serve import jobs
from raytseg.serve.config import JobsSpec, load_config
from raytseg.serve.flow import StageNames
from raytseg.serve.handoff import Delivered, Delivery
from raytseg.serve.jobs import JobRunner, JobSpec, Route, key_digest
from raytseg.serve.jobstore import JobStore

ROUTE = Route(StageNames("app", (), False), load_config({}, {}))


class NullRecorder:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Runner(JobRunner):
    """A job actor whose segmentations wait for ``release`` and name the runner in their output."""

    def __init__(self, spec: JobsSpec, name: str) -> None:
        super().__init__(spec, "app")
        self.name, self.release, self.runs = name, asyncio.Event(), 0

    def _flow(self, route: Route) -> Any:
        return self

    async def segment(self, source: str, options: SegmentOptions, delivery: Delivery, _: str) -> Delivered:
        self.runs += 1
        await self.release.wait()
        return Delivered(None, "", "", written=(f"{delivery.output}/by-{self.name}",), task=options.task)


@pytest.fixture(autouse=True)
def no_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "recorder", NullRecorder)


def spec(name: str) -> JobSpec:
    options = SegmentOptions(fast=True)
    return JobSpec(input=f"s3://in/{name}.nii.gz", output=f"s3://out/{name}", options=options)


def stored(folder: Path) -> dict[str, dict[str, Any]]:
    records = (json.loads(data) for data in JobStore(str(folder), "app").records())
    return {r["id"]: r for r in records}


async def one_running_one_queued(runner: Runner) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two jobs on a runner with ``max_running`` 1, once the first one runs."""
    running, _ = await runner.submit(spec("one"), ROUTE)
    queued, _ = await runner.submit(spec("two"), ROUTE)
    while runner.runs == 0:
        await asyncio.sleep(0.01)
    return running, queued


async def settle(runner: JobRunner) -> None:
    while runner._tasks:
        await asyncio.sleep(0.01)


def test_a_job_is_recorded_before_it_is_acknowledged(tmp_path: Path) -> None:
    async def run() -> None:
        runner = Runner(JobsSpec(store=str(tmp_path)), "first")
        record, replayed = await runner.submit(spec("ct"), ROUTE)
        assert not replayed
        assert stored(tmp_path)[record["id"]]["spec"]["input"] == "s3://in/ct.nii.gz"
        runner.release.set()
        await settle(runner)
        done = stored(tmp_path)[record["id"]]
        assert done["state"] == "succeeded"
        assert done["outputs"] == ["s3://out/ct/by-first"]

    asyncio.run(run())


def test_a_successor_runs_unfinished_jobs_again_and_the_old_actor_commits_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        old = Runner(JobsSpec(store=str(tmp_path), max_running=1), "old")
        running, queued = await one_running_one_queued(old)
        new = Runner(JobsSpec(store=str(tmp_path), max_running=1), "new")
        new.release.set()
        await new.attach(ROUTE)
        await settle(new)
        old.release.set()  # the replaced actor's run ends after all
        await settle(old)
        records = stored(tmp_path)
        for job in (running, queued):
            assert records[job["id"]]["state"] == "succeeded"
            assert records[job["id"]]["outputs"] == [f"{job['output_uri']}/by-new"]
            assert (await old.status(job["id"], ROUTE)) == await new.status(job["id"], ROUTE)
        assert old.runs == 1  # it never started the queued job: the store was no longer its own
        with pytest.raises(ReplicaUnavailableError, match="replaced"):
            await old.submit(spec("three"), ROUTE)

    asyncio.run(run())


def test_finished_jobs_keep_their_records_and_are_not_run_again(tmp_path: Path) -> None:
    async def run() -> None:
        first = Runner(JobsSpec(store=str(tmp_path)), "first")
        first.release.set()
        record, _ = await first.submit(spec("ct"), ROUTE)
        await settle(first)
        second = Runner(JobsSpec(store=str(tmp_path)), "second")
        answer = await second.status(record["id"], ROUTE)
        assert answer is not None
        assert answer["state"] == "succeeded"
        assert answer["outputs"] == ["s3://out/ct/by-first"]
        assert second.runs == 0

    asyncio.run(run())


def test_an_idempotency_key_answers_its_job_across_restarts(tmp_path: Path) -> None:
    key = key_digest("3f0c1f9e-client-key")

    async def run() -> None:
        first = Runner(JobsSpec(store=str(tmp_path)), "first")
        record, _ = await first.submit(spec("ct"), ROUTE, key)
        again, replayed = await first.submit(spec("ct"), ROUTE, key)
        assert replayed
        assert again["id"] == record["id"]
        with pytest.raises(IdempotencyConflictError, match=record["id"]):
            await first.submit(spec("another"), ROUTE, key)
        second = Runner(JobsSpec(store=str(tmp_path)), "second")
        after, replayed = await second.submit(spec("ct"), ROUTE, key)
        assert replayed
        assert after["id"] == record["id"]
        assert len(stored(tmp_path)) == 1
        second.release.set()
        await settle(second)

    asyncio.run(run())


def test_keep_finished_is_applied_in_the_store(tmp_path: Path) -> None:
    async def run() -> list[str]:
        runner = Runner(JobsSpec(store=str(tmp_path), keep_finished=2, max_running=1), "only")
        runner.release.set()
        ids = []
        for name in ("a", "b", "c", "d"):
            ids.append((await runner.submit(spec(name), ROUTE))[0]["id"])
            await settle(runner)
        return ids

    ids = asyncio.run(run())
    assert sorted(stored(tmp_path)) == sorted(ids[2:])


def test_without_a_store_records_live_in_memory(tmp_path: Path) -> None:
    async def run() -> None:
        runner = Runner(JobsSpec(), "memory")
        runner.release.set()
        record, _ = await runner.submit(spec("ct"), ROUTE)
        await settle(runner)
        answer = await runner.status(record["id"], ROUTE)
        assert answer is not None
        assert answer["state"] == "succeeded"

    asyncio.run(run())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["", "x" * 256, "with space", "naïve"])
def test_malformed_idempotency_keys_are_refused(key: str) -> None:
    with pytest.raises(InputError, match="Idempotency-Key"):
        key_digest(key)


def test_a_draining_actor_finishes_running_jobs_and_leaves_queued_ones_to_the_next_start(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        runner = Runner(JobsSpec(store=str(tmp_path), max_running=1), "draining")
        running, queued = await one_running_one_queued(runner)
        assert await runner.drain() == 1
        runner.release.set()
        await settle(runner)
        assert await runner.drain() == 0
        records = stored(tmp_path)
        assert records[running["id"]]["state"] == "succeeded"
        assert records[queued["id"]]["state"] == "queued"
        successor = Runner(JobsSpec(store=str(tmp_path)), "next")
        successor.release.set()
        await successor.attach(ROUTE)
        await settle(successor)
        assert stored(tmp_path)[queued["id"]]["outputs"] == ["s3://out/two/by-next"]

    asyncio.run(run())
