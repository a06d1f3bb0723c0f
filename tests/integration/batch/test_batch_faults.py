"""Faults: a job killed midway and rerun, a worker killed while it holds an item.

The jobs run as subprocesses (``python -m raytseg.batch``, each with its own local Ray) in
a process group of their own, so the test can SIGKILL the driver and every process it
started, and check afterwards that none survived.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from raytseg.batch import BatchConfig, run_batch
from raytseg.batch.commit import MARKER_NAME

psutil = pytest.importorskip("psutil")

ITEMS = {  # item id -> input name (small images: these tests are about faults, not formats)
    "ct_again": "ct_again.nii.gz",
    "ct_small": "ct_small.nii.gz",
    "mr_small": "mr_small.nii.gz",
}
JOB_TIMEOUT_S = 240


@contextmanager
def batch_process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m raytseg.batch <args>`` in its own process group; everything killed at exit."""
    command = [sys.executable, "-m", "raytseg.batch", "--num-cpus", "2", "-q", *args]
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        kill_tree(process)


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the job and every process it started (Ray's, even those in other groups)."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"processes survived the kill: {alive}"


def wait_for(condition: Callable[[], Any], what: str, process: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            pytest.fail(f"The job ended (exit {process.returncode}) before {what}:\n{crash_excerpt(stderr)}")
        time.sleep(0.05)
    pytest.fail(f"Timed out waiting for {what}")


def crash_excerpt(stderr: str) -> str:
    """The end of ``stderr``, from the faulthandler's report when there is one (a native
    crash prints every thread's frames; the crashing one comes first)."""
    start = stderr.find("Fatal Python error")
    return stderr[start : start + 20_000] if start >= 0 else stderr[-3000:]


def markers(s3: Any, output: str) -> dict[str, bytes]:
    """``{item id: marker bytes}`` of the complete items under an s3:// output."""
    prefix = output.removeprefix("s3://")
    s3.invalidate_cache()
    found = s3.glob(f"{prefix}/*/{MARKER_NAME}")
    return {path.split("/")[-2]: s3.cat_file(path) for path in found}


def test_killed_job_rerun_does_every_item_exactly_once(
    s3: Any,
    upload: Callable[..., str],
    s3_prefix: str,
    s3_files: Callable[[str], dict[str, bytes]],
    reference_outputs: Callable[..., Path],
    local_files: Callable[[Path], dict[str, bytes]],
    item_files: Callable[[dict[str, bytes], str], dict[str, bytes]],
) -> None:
    source = upload(f"{s3_prefix}/in", *ITEMS.values(), "corrupt.nii.gz")
    output = f"s3://{s3_prefix}/out"
    with batch_process("--input", source, "--output", output, "--fast", "-d", "cpu") as job:
        wait_for(lambda: markers(s3, output), "the first item was complete", job)
        kill_tree(job)  # SIGKILL, no chance to clean up
    first = markers(s3, output)
    assert 1 <= len(first) < len(ITEMS), "the kill should come midway"
    expected = {item: local_files(reference_outputs(same_as(name), "--fast")) for item, name in ITEMS.items()}
    written = s3_files(output)
    for item in first:  # what is marked complete is complete
        assert item_files(written, item) == expected[item]

    report = run_batch(BatchConfig(input=source, output=output, fast=True, device="cpu", max_failures=1))

    statuses = {r.id: r.status for r in report.results}
    assert len(report.results) == len(statuses) == len(ITEMS) + 1
    assert statuses == {
        **{item: "skipped" if item in first else "ok" for item in ITEMS},
        "corrupt": "failed",
    }
    assert {item: data for item, data in markers(s3, output).items() if item in first} == first  # not redone
    written = s3_files(output)
    for item in ITEMS:  # nothing partial or stale left beside the outputs
        assert item_files(written, item) == expected[item], item
    assert not [name for name in written if name.startswith(("_staging", "corrupt"))]
    table = read_ids(written["_results.parquet"])
    assert sorted(table) == sorted([*ITEMS, "corrupt"])


def test_item_of_a_killed_worker_is_retried(
    s3: Any,
    upload: Callable[..., str],
    s3_prefix: str,
    s3_files: Callable[[str], dict[str, bytes]],
    reference_outputs: Callable[..., Path],
    local_files: Callable[[Path], dict[str, bytes]],
    item_files: Callable[[dict[str, bytes], str], dict[str, bytes]],
) -> None:
    source = upload(f"{s3_prefix}/in", *ITEMS.values())
    output = f"s3://{s3_prefix}/out"
    with batch_process("--input", source, "--output", output, "--fast", "-d", "cpu") as job:
        # A model actor shows the method it runs in its process title: ".submit" = busy on an item.
        busy = wait_for(
            lambda: find_process(job, "MapBatches(ModelStage)).submit"), "a busy model actor", job
        )
        busy.kill()
        assert job.wait(timeout=JOB_TIMEOUT_S) == 0, job.stderr.read().decode() if job.stderr else ""
    written = s3_files(output)
    assert read_statuses(written["_results.parquet"]) == dict.fromkeys(ITEMS, "ok")
    for item, name in ITEMS.items():
        assert item_files(written, item) == local_files(reference_outputs(same_as(name), "--fast")), item


def test_item_whose_worker_keeps_dying_is_reported_and_the_job_ends(
    upload: Callable[..., str], s3_prefix: str, s3_files: Callable[[str], dict[str, bytes]]
) -> None:
    source = upload(f"{s3_prefix}/in", *ITEMS.values())
    output = f"s3://{s3_prefix}/out"
    with batch_process("--input", source, "--output", output, "--fast", "-d", "cpu", "--retries", "0") as job:
        busy = wait_for(
            lambda: find_process(job, "MapBatches(ModelStage)).submit"), "a busy model actor", job
        )
        busy.kill()
        assert job.wait(timeout=JOB_TIMEOUT_S) == 3  # failures beyond --max-failures 0
    statuses = read_statuses(s3_files(output)["_results.parquet"])
    assert sorted(statuses) == sorted(ITEMS)
    # The item on the killed actor (and any queued behind it) failed; the actor came back for the rest.
    assert "failed" in statuses.values()
    table = read_table_rows(s3_files(output)["_results.parquet"])
    assert {row["error_type"] for row in table if row["status"] == "failed"} == {"WorkerCrashedError"}


def same_as(name: str) -> str:
    """The input whose reference outputs fit ``name`` (ct_again is a copy of ct_small)."""
    return "ct_small.nii.gz" if name == "ct_again.nii.gz" else name


def find_process(job: subprocess.Popen[bytes], title_part: str) -> Any:
    try:
        family = psutil.Process(job.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for process in family:
        try:
            if title_part in " ".join(process.cmdline()):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def read_ids(data: bytes) -> list[str]:
    return list(read_statuses(data))


def read_table_rows(data: bytes) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(data)).to_pylist()
    return rows


def read_statuses(data: bytes) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    return dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist(), strict=True))


@pytest.fixture(autouse=True)
def _no_ray_in_this_process() -> Iterator[None]:
    """run_batch here starts (and must stop) its own local Ray."""
    import ray

    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized()
