"""A job's outputs, committed once: each run writes into a staging folder of its own, and
only the run whose commit the job store holds (``JobStore.hold_commit``) moves its files
into place.

    <folder>/.raytseg-staging/<job id>-<attempt>/...   a run's files, as it writes them
    <folder>/...                                       after the commit: moved here

``<folder>`` is the job's output folder, or the folder of the file ``output_uri`` names, so
staging stays under the locations the allow-list admitted. A commit is a marker written
once (``Commit``: the staging, the moves, what the job's record will say), then the moves,
then the staging folder removed. Moves are idempotent, so whoever finds a marker whose
moves were cut short (a lost actor, a storage outage) completes them.

No Ray here: the job actor (``raytseg.serve.jobs``) calls these functions in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from raytseg import storage
from raytseg.pipeline.export import target_folder
from raytseg.pipeline.records import OutputOptions
from raytseg.retry import OUTAGE_RETRY
from raytseg.serve.handoff import Delivered

STAGING_NAME = ".raytseg-staging"


class Staging(BaseModel):
    """Where one run of a job writes (``output``), and the folder its files move into."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str  # the run's own folder
    final: str  # the output folder its files move into
    output: str  # the run's output_uri: ``root``, or the file it names in ``root``

    @classmethod
    def new(cls, job_id: str, output: str, files: OutputOptions | None) -> Staging:
        """A new run's staging; ``files`` None: a tool's JSON file."""
        final = storage.parent(output) if files is None else target_folder(files, output)
        root = storage.join(final, STAGING_NAME, f"{job_id}-{uuid.uuid4().hex[:8]}")
        named = output != final
        inside = storage.join(root, storage.base_name(output)) if named else root
        return cls(root=root, final=final, output=inside)

    def final_location(self, written: str) -> str:
        """Where a file the run wrote ends up (a location outside the staging: unchanged)."""
        prefix = self.root.rstrip("/") + "/"
        return storage.join(self.final, written[len(prefix) :]) if written.startswith(prefix) else written


class Commit(BaseModel):
    """The run whose outputs are the job's: the job store holds one per job, written once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    staging: Staging
    moves: tuple[tuple[str, str], ...]  # (staged, final) locations
    outputs: tuple[str, ...]  # the record's outputs, report and answer once committed
    report: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None


def moves_of(staging: Staging, written: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The moves that commit the files a run wrote (DICOMweb instances stay where they are)."""
    return tuple((w, staging.final_location(w)) for w in written if staging.final_location(w) != w)


def placed(staging: Staging, delivered: Delivered) -> Delivered:
    """``delivered`` as it reads once committed: its files at their final locations."""
    return dataclasses.replace(delivered, written=tuple(map(staging.final_location, delivered.written)))


def finish(commit: Commit) -> None:
    """Move the commit's files into place (again, if that was cut short) and drop its staging."""
    fs, _ = storage.fs_and_path(commit.staging.root)
    paths = [(storage.fs_and_path(src)[1], storage.fs_and_path(dst)[1]) for src, dst in commit.moves]
    storage.make_dirs(commit.staging.final)
    storage.move_all(fs, paths, OUTAGE_RETRY)
    drop(commit.staging)


def drop(staging: Staging) -> None:
    """Remove a run's staging folder, and the staging area once it is empty (a local
    folder; object stores have no empty folders)."""
    storage.remove_tree(staging.root)
    if not storage.is_uri(staging.root):
        with contextlib.suppress(OSError):  # not empty: another run of this folder stages there
            storage.local_path(storage.parent(staging.root)).rmdir()
