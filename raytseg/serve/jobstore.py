"""Job records that outlive the job actor, the ingress replicas and the Ray cluster.

``jobs.store`` names a folder or an object-store prefix; each app keeps there::

    <store>/<app>/jobs/<id>.json    one record per job, rewritten whole at each change
    <store>/<app>/owners/<n>        one empty object per job actor that took the app's jobs
    <store>/<app>/commits/<id>.json the run of a job whose outputs are committed, created once

Why an object store rather than a database: every raytseg deployment has one already
(inputs, outputs and remote weights live there), it survives whatever happens to the
cluster, and both clusters of a RayService blue/green upgrade reach the same prefix. A
record is a small JSON object written in one PUT (locally: written aside and renamed), so a
reader sees the old or the new record, never half of one.

One writer at a time, by fencing: a job actor that starts takes the next owner number by
creating ``owners/<n>`` exclusively (``If-None-Match: *`` on S3, ``O_EXCL`` locally), and
only the holder of the highest number accepts, starts or commits jobs. The actor of a
replaced cluster, or a job actor that Ray restarted, therefore yields to the newer one,
which runs again whatever was queued or running.

Outputs committed once: a run writes into a staging folder of its own, then creates the
job's commit marker exclusively, naming its staging and what the record will say. Only the
run that created it moves its files into place; a run that finds a marker drops its own
files and completes the marker's commit instead (moves are idempotent), so an old actor
that finishes after its successor started the job again, or a successor that finds a
commit cut short, never commits a second set of outputs.

No Ray here: the job actor (``raytseg.serve.jobs``) calls these functions in a thread.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

from raytseg.retry import OUTAGE_RETRY, RetryPolicy
from raytseg.storage import base_name, filesystem, join, remove_files, storage_error, write_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

_OWNER = re.compile(r"^\d{12}$")
_RECORD = re.compile(r"^[0-9a-f]{32}\.json$")  # job ids are uuid4 hex


class JobStore:
    """The records of one app's jobs under ``location`` (a local folder or an fsspec URI)."""

    def __init__(self, location: str, app: str, retry: RetryPolicy = OUTAGE_RETRY) -> None:
        self.location, self.app, self.retry = location, app, retry
        self._fs, self._root = filesystem(location)

    def claim(self) -> int:
        """Become the app's job owner: the number of this claim, higher than every earlier one."""

        def take() -> int:
            self._fs.makedirs(self._path("owners"), exist_ok=True)  # local folders only
            while True:
                number = max(self._owners(), default=0) + 1
                try:
                    self._fs.pipe_file(self._path("owners", f"{number:012d}"), b"", mode="create")
                except FileExistsError:  # another actor took this number first
                    continue
                return number

        number = self._call(take, "claiming the job records")
        self._prune_owners(below=number)
        return number

    def is_owner(self, number: int) -> bool:
        """Whether no actor has claimed the jobs since claim ``number``."""
        return self._call(lambda: max(self._owners(), default=0), "reading the job owner") == number

    def records(self) -> list[bytes]:
        """Every stored job record, unparsed."""

        def read_all() -> list[bytes]:
            names = [n for n in self._names("jobs") if _RECORD.match(n)]
            if not names:
                return []
            found: dict[str, Any] = self._fs.cat([self._path("jobs", n) for n in names], on_error="omit")
            return list(found.values())

        return self._call(read_all, "reading the job records")

    def record(self, job_id: str) -> bytes | None:
        """One job's record, or None if there is none."""
        return self._read("jobs", job_id, f"reading job {job_id}")

    def save(self, job_id: str, record: bytes) -> None:
        """Write (or replace) one job's record."""
        location = join(self.location, self.app, "jobs", f"{job_id}.json")
        self._call(lambda: write_bytes(location, record), f"recording job {job_id}")

    def hold_commit(self, job_id: str, commit: bytes) -> bytes:
        """Create the job's commit marker as ``commit`` unless it exists; the marker that
        holds (``commit``, or the one an earlier run created)."""
        path = self._path("commits", f"{job_id}.json")

        def create() -> bytes:
            self._fs.makedirs(self._path("commits"), exist_ok=True)  # local folders only
            try:
                self._fs.pipe_file(path, commit, mode="create")
            except FileExistsError:  # an earlier run's (or this one's, whose answer was lost)
                held: bytes = self._fs.cat_file(path)
                return held
            return commit

        return self._call(create, f"committing job {job_id}")

    def commit(self, job_id: str) -> bytes | None:
        """The job's commit marker, or None if no run has committed it."""
        return self._read("commits", job_id, f"reading the commit of job {job_id}")

    def forget(self, job_ids: list[str]) -> None:
        """Delete these jobs' records and commit markers (retention)."""
        paths = [self._path(folder, f"{i}.json") for i in job_ids for folder in ("jobs", "commits")]
        if paths:
            self._call(lambda: remove_files(self._fs, paths), "deleting old job records")

    def _read(self, folder: str, job_id: str, what: str) -> bytes | None:
        """``<folder>/<job_id>.json``, or None if there is none (or ``job_id`` is no job id)."""
        name = f"{job_id}.json"

        def read() -> bytes | None:
            try:
                data: bytes = self._fs.cat_file(self._path(folder, name))
            except FileNotFoundError:
                return None
            return data

        return self._call(read, what) if _RECORD.match(name) else None

    def _path(self, *names: str) -> str:
        return join(self._root, self.app, *names)

    def _names(self, folder: str) -> list[str]:
        try:  # refresh: s3fs would answer from its listing cache, blind to other writers
            entries = self._fs.ls(self._path(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [base_name(e) for e in entries]

    def _owners(self) -> list[int]:
        return [int(n) for n in self._names("owners") if _OWNER.match(n)]

    def _prune_owners(self, below: int) -> None:
        """Older claims are kept only as numbers to beat; the two before ``below`` suffice."""
        old = [self._path("owners", f"{n:012d}") for n in self._owners() if n < below - 2]
        if old:
            try:
                self._fs.rm(old)
            except OSError as exc:  # harmless: the next claim prunes them
                log.warning("Could not delete old job owner claims: %s", exc)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return self.retry.call(fn, f"Job store {self.location}: {what}")
        except Exception as exc:  # the same class (unavailable or not), with the setting to check
            error = storage_error(self.location, what, exc)
            raise type(error)(
                f"The job store {self.location} failed while {what} ({exc}). "
                "Check that it is reachable and writable (jobs.store)."
            ) from exc
