"""What the deployments hand each other, and how big arrays travel between them.

Every large intermediate (the loaded volume, the network inputs, the labels) is the
return value of a deployment call, kept in the Ray object store and owned by the caller
(the ingress, or the job runner). The caller never fetches one: it passes the
``DeploymentResponse`` on as an argument, and Ray moves the data from the producing
replica to the consuming one (zero-copy on one node, one transfer per node otherwise).
No stage returns refs it ``ray.put`` itself: such refs would be owned by a replica that
may be scaled down, and Serve does not track refs nested in return values reliably.

    load ──Volume──▶ prepare ──Prepared──▶ model (one call per network, concurrently)
                         │                        │ NetworkOutput per z chunk
                         └──────────────────────▶ finish ──Delivered (bytes, or locations written)

A crop pass runs the same way and ends in ``end_pass`` (``AfterPass``: what
``raytseg.pipeline.passes.after_pass`` answered), which the next pass's ``prepare`` and
``finish`` take as an argument. When the crop region is empty that answer is already the
request's (all-zero) segmentation: ``prepare`` returns None, every later stage passes it
on, and ``finish`` delivers it, without the caller having to look.

Arrays read from the object store are read-only views; ``own_arrays`` copies the few a
stage is about to modify.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from raytseg.pipeline.records import OutputOptions, TaskChoice

if TYPE_CHECKING:
    from raytseg.pipeline.passes import Region
    from raytseg.pipeline.records import Segmentation

Entrypoint = Literal["http", "job"]
T = TypeVar("T")


@dataclass(frozen=True)
class Tags:
    """Metric tags a request carries through every stage."""

    task: str
    entrypoint: Entrypoint
    crop_pass: bool = False

    def stage(self, name: str) -> str:
        """Stage name for metrics; the crop pass's stages are told apart (``crop_model``)."""
        return f"crop_{name}" if self.crop_pass else name


@dataclass(frozen=True)
class AfterPass:
    """What follows a crop pass: the next pass's region, or already the request's answer."""

    following: Region | Segmentation

    @property
    def region(self) -> Region | None:
        """The region; None when the crop region was empty (``answer`` is set instead)."""
        from raytseg.pipeline.passes import Region

        return self.following if isinstance(self.following, Region) else None

    @property
    def answer(self) -> Segmentation | None:
        """The request's all-zero segmentation when the crop region was empty, else None."""
        from raytseg.pipeline.records import Segmentation

        return self.following if isinstance(self.following, Segmentation) else None


@dataclass(frozen=True)
class Delivery:
    """What to produce: response bytes, files written under ``output`` (jobs), or with
    ``statistics_only`` nothing but the statistics (the classifier tools' features)."""

    files: OutputOptions = OutputOptions(ml=True)
    output: str | None = None
    statistics_only: bool = False


@dataclass(frozen=True)
class Delivered:
    """The result of a segmentation: a response body, or the locations written."""

    body: bytes | None
    media_type: str
    filename: str
    written: tuple[str, ...] = ()
    statistics: dict[str, dict[str, Any]] | None = None
    task: str = ""  # the task that ran, and the classes it reports (for a job's run report)
    classes: dict[int, str] = dataclasses.field(default_factory=dict)
    task_choice: TaskChoice | None = None  # what task auto chose, and why
    backends: dict[str, str] = dataclasses.field(default_factory=dict)  # what ran each network


def own_arrays(record: T) -> T:
    """``record`` (a dataclass) with writable copies of its read-only arrays, recursively."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        return record
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            changes[f.name] = value.copy()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            owned = own_arrays(value)
            if owned is not value:
                changes[f.name] = owned
    return dataclasses.replace(record, **changes) if changes else record
