"""Small records the deployments hand each other; big arrays stay behind ``ObjectRef``s.

A CPU stage puts each large result (the loaded volume, one network input per model,
the crop region) into the Ray object store itself and returns only these records, so the
ingress, which routes the work, never fetches an array: it passes the refs on, and Ray
moves the data from the producing replica to the consuming one (zero-copy on one node).

    ingress ──bytes/URI──▶ preprocess.load ──VolumeRef──▶ preprocess.prepare ──PreparedRef
        PreparedRef.inputs[i].ref ──▶ model (one replica per part, concurrently) ──labels
        labels ×n + PreparedRef.rest ──▶ postprocess.finish ──Delivered (bytes or URIs)

Arrays read from the object store are read-only views; ``own_arrays`` copies the few
that a stage is about to modify.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from raytseg.pipeline.records import Shape3

if TYPE_CHECKING:
    from ray import ObjectRef

    from raytseg.pipeline.records import NetworkInput, Prepared, Volume
    from raytseg.pipeline.run import Region

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
class VolumeRef:
    """A loaded image in the object store, with what routing needs to know about it."""

    ref: ObjectRef[Volume]
    shape: Shape3
    modality: str | None

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class InputRef:
    """One network input in the object store, addressed to one model."""

    model_key: str
    chunk: int
    ref: ObjectRef[NetworkInput]


@dataclass(frozen=True)
class PreparedRef:
    """Preprocessing result: the inputs to route, and the rest (inverse record) for postprocessing."""

    inputs: tuple[InputRef, ...]
    rest: ObjectRef[Prepared]  # a Prepared without its inputs


@dataclass(frozen=True)
class RegionRef:
    """Where the crop pass found the task's region; ``ref`` is None when it is empty."""

    ref: ObjectRef[Region] | None


@dataclass(frozen=True)
class Delivery:
    """What to produce: response bytes, or files written under ``output`` (jobs)."""

    ml: bool = True
    output: str | None = None


@dataclass(frozen=True)
class Delivered:
    """The result of a segmentation: a response body, or the locations written."""

    body: bytes | None
    media_type: str
    filename: str
    written: tuple[str, ...] = ()
    statistics: dict[str, dict[str, Any]] | None = None


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
    return dataclasses.replace(record, **changes) if changes else record  # type: ignore[type-var]
