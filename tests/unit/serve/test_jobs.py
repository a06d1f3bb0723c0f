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
from raytseg.pipeline.records import OutputOptions, SegmentOptions
from raytseg.serve import jobs
from raytseg.serve.config import JobsSpec, load_config
from raytseg.serve.flow import StageNames
from raytseg.serve.handoff import Delivered, Delivery
from raytseg.serve.jobcommit import Commit, Staging, moves_of
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
        assert delivery.output is not None
        written = Path(delivery.output) / f"by-{self.name}"
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(self.name)
        return Delivered(None, "", "", written=(str(written),), task=options.task)


@pytest.fixture(autouse=True)
def no_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "recorder", NullRecorder)


def spec(name: str, root: Path) -> JobSpec:
    """A job whose output folder is under ``root`` (the stand-in flow writes a file there)."""
    options = SegmentOptions(fast=True)
    return JobSpec(input=f"s3://in/{name}.nii.gz", output=str(root / "out" / name), options=options)


def stored(folder: Path) -> dict[str, dict[str, Any]]:
    records = (json.loads(data) for data in JobStore(str(folder), "app").records())
    return {r["id"]: r for r in records}


async def one_running_one_queued(runner: Runner, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two jobs on a runner with ``max_running`` 1, once the first one runs."""
    running, _ = await runner.submit(spec("one", tmp_path), ROUTE)
    queued, _ = await runner.submit(spec("two", tmp_path), ROUTE)
    while runner.runs == 0:
        await asyncio.sleep(0.01)
    return running, queued


def files(folder: str) -> list[str]:
    """The names in a job's output folder: its committed files and nothing else."""
    return sorted(p.name for p in Path(folder).iterdir())


async def settle(runner: JobRunner) -> None:
    while runner._tasks:
        await asyncio.sleep(0.01)


def test_a_job_is_recorded_before_it_is_acknowledged(tmp_path: Path) -> None:
    async def run() -> None:
        runner = Runner(JobsSpec(store=str(tmp_path)), "first")
        record, replayed = await runner.submit(spec("ct", tmp_path), ROUTE)
        assert not replayed
        assert stored(tmp_path)[record["id"]]["spec"]["input"] == "s3://in/ct.nii.gz"
        runner.release.set()
        await settle(runner)
        done = stored(tmp_path)[record["id"]]
        assert done["state"] == "succeeded"
        assert done["outputs"] == [f"{tmp_path}/out/ct/by-first"]

    asyncio.run(run())


def test_a_successor_runs_unfinished_jobs_again_and_the_old_actor_commits_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        old = Runner(JobsSpec(store=str(tmp_path), max_running=1), "old")
        running, queued = await one_running_one_queued(old, tmp_path)
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
            assert files(job["output_uri"]) == ["by-new"]  # the old run's files were dropped
            assert (await old.status(job["id"], ROUTE)) == await new.status(job["id"], ROUTE)
        assert old.runs == 1  # it never started the queued job: the store was no longer its own
        with pytest.raises(ReplicaUnavailableError, match="replaced"):
            await old.submit(spec("three", tmp_path), ROUTE)

    asyncio.run(run())


def test_an_old_actor_that_commits_first_keeps_the_outputs_committed_once(tmp_path: Path) -> None:
    async def run() -> None:
        old = Runner(JobsSpec(store=str(tmp_path)), "old")
        job, _ = await old.submit(spec("ct", tmp_path), ROUTE)
        while old.runs == 0:
            await asyncio.sleep(0.01)
        new = Runner(JobsSpec(store=str(tmp_path)), "new")
        await new.attach(ROUTE)  # takes the store over and runs the job again
        while new.runs == 0:
            await asyncio.sleep(0.01)
        old.release.set()  # the old run ends first: its commit is the job's
        await settle(old)
        new.release.set()  # the new run then finds that commit and drops its own files
        await settle(new)
        record = stored(tmp_path)[job["id"]]
        assert (record["state"], record["outputs"]) == ("succeeded", [f"{job['output_uri']}/by-old"])
        assert files(job["output_uri"]) == ["by-old"]

    asyncio.run(run())


def test_a_commit_cut_short_is_completed_without_running_the_job_again(tmp_path: Path) -> None:
    async def run() -> None:
        lost = Runner(JobsSpec(store=str(tmp_path)), "lost")
        job, _ = await lost.submit(spec("ct", tmp_path), ROUTE)
        # The lost actor's run had written its file and taken the commit, then died moving it.
        staging = Staging.new(job["id"], job["output_uri"], OutputOptions(ml=True))
        Path(staging.root).mkdir(parents=True)
        (Path(staging.root) / "by-lost").write_text("lost")
        moves = moves_of(staging, (f"{staging.root}/by-lost",))
        commit = Commit(staging=staging, moves=moves, outputs=(moves[0][1],), report={"task": "total"})
        JobStore(str(tmp_path), "app").hold_commit(job["id"], commit.model_dump_json().encode())
        successor = Runner(JobsSpec(store=str(tmp_path)), "next")
        await successor.attach(ROUTE)
        await settle(successor)
        record = stored(tmp_path)[job["id"]]
        assert (record["state"], record["outputs"], record["report"]) == (
            "succeeded",
            [moves[0][1]],
            commit.report,
        )
        assert successor.runs == 0
        assert files(job["output_uri"]) == ["by-lost"]
        lost.release.set()
        await settle(lost)
        assert files(job["output_uri"]) == ["by-lost"]  # the lost actor's own run commits nothing more

    asyncio.run(run())


def test_finished_jobs_keep_their_records_and_are_not_run_again(tmp_path: Path) -> None:
    async def run() -> None:
        first = Runner(JobsSpec(store=str(tmp_path)), "first")
        first.release.set()
        record, _ = await first.submit(spec("ct", tmp_path), ROUTE)
        await settle(first)
        second = Runner(JobsSpec(store=str(tmp_path)), "second")
        answer = await second.status(record["id"], ROUTE)
        assert answer is not None
        assert answer["state"] == "succeeded"
        assert answer["outputs"] == [f"{tmp_path}/out/ct/by-first"]
        assert second.runs == 0

    asyncio.run(run())


def test_an_idempotency_key_answers_its_job_across_restarts(tmp_path: Path) -> None:
    key = key_digest("3f0c1f9e-client-key")

    async def run() -> None:
        first = Runner(JobsSpec(store=str(tmp_path)), "first")
        record, _ = await first.submit(spec("ct", tmp_path), ROUTE, key)
        again, replayed = await first.submit(spec("ct", tmp_path), ROUTE, key)
        assert replayed
        assert again["id"] == record["id"]
        with pytest.raises(IdempotencyConflictError, match=record["id"]):
            await first.submit(spec("another", tmp_path), ROUTE, key)
        second = Runner(JobsSpec(store=str(tmp_path)), "second")
        after, replayed = await second.submit(spec("ct", tmp_path), ROUTE, key)
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
            ids.append((await runner.submit(spec(name, tmp_path), ROUTE))[0]["id"])
            await settle(runner)
        return ids

    ids = asyncio.run(run())
    assert sorted(stored(tmp_path)) == sorted(ids[2:])


def test_without_a_store_records_live_in_memory(tmp_path: Path) -> None:
    async def run() -> None:
        runner = Runner(JobsSpec(), "memory")
        runner.release.set()
        record, _ = await runner.submit(spec("ct", tmp_path), ROUTE)
        await settle(runner)
        answer = await runner.status(record["id"], ROUTE)
        assert answer is not None
        assert answer["state"] == "succeeded"

    asyncio.run(run())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the job's output only: no store


@pytest.mark.parametrize("key", ["", "x" * 256, "with space", "naïve"])
def test_malformed_idempotency_keys_are_refused(key: str) -> None:
    with pytest.raises(InputError, match="Idempotency-Key"):
        key_digest(key)


def test_a_draining_actor_finishes_running_jobs_and_leaves_queued_ones_to_the_next_start(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        runner = Runner(JobsSpec(store=str(tmp_path), max_running=1), "draining")
        running, queued = await one_running_one_queued(runner, tmp_path)
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
        assert stored(tmp_path)[queued["id"]]["outputs"] == [f"{tmp_path}/out/two/by-next"]

    asyncio.run(run())
