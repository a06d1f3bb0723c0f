"""One result per item, and the job's results table (Parquet).

Columns: ``id, input, output, task, status`` (ok, failed, skipped), ``error_type`` and
``error_message`` (failed items), ``outputs`` (the files written), ``voxels``, one
``<stage>_s`` column of seconds per stage (load, preprocess, model, postprocess, write,
total), ``statistics`` (the statistics.json content, when asked), ``report`` (the run
report, ``raytseg.pipeline.report``, as JSON), ``answer`` (a tool job's JSON: ``--tool``),
``finished_at`` (UTC, ISO 8601) and ``attempt`` (the run that wrote the outputs).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Status = Literal["ok", "failed", "skipped"]
STAGES = ("load", "preprocess", "model", "postprocess", "write", "total")


@dataclass(frozen=True)
class ItemResult:
    """What happened to one item."""

    id: str
    input: str
    output: str
    task: str
    status: Status
    error_type: str | None = None
    error_message: str | None = None
    outputs: tuple[str, ...] = ()
    voxels: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    statistics: str | None = None  # JSON
    report: str | None = None  # JSON
    answer: str | None = None  # a tool's JSON
    finished_at: str | None = None
    attempt: str | None = None
    fingerprint: str | None = None  # the options that produced the outputs

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ItemResult:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemResult:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        known["outputs"] = tuple(known.get("outputs", ()))
        return cls(**known)

    def as_skipped(self) -> ItemResult:
        return replace(self, status="skipped")


@dataclass
class JobProgress:
    """Counts of a running job, for progress displays."""

    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)
    computed: int = 0  # items this run finished (ok or failed), for the rate

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def rate_per_hour(self) -> float:
        elapsed = time.monotonic() - self.started
        return 3600.0 * self.computed / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate_per_hour
        return None if rate <= 0 else 3600.0 * (self.total - self.done) / rate

    def add(self, result: ItemResult) -> None:
        if result.status == "skipped":
            self.skipped += 1
            return
        self.computed += 1
        if result.status == "ok":
            self.ok += 1
        else:
            self.failed += 1


ProgressCallback = Callable[[JobProgress, ItemResult], None]


@dataclass(frozen=True)
class BatchReport:
    """What a job did: one result per item, and whether failures passed the limit."""

    results: tuple[ItemResult, ...]
    results_uri: str
    elapsed_s: float
    failures_exceeded: bool

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def results_table(results: Iterable[ItemResult]) -> Any:
    """The results as a ``pyarrow.Table`` with a fixed schema (also when empty)."""
    import pyarrow as pa  # type: ignore[import-untyped]

    rows = list(results)
    columns: dict[str, list[Any]] = {
        "id": [r.id for r in rows],
        "input": [r.input for r in rows],
        "output": [r.output for r in rows],
        "task": [r.task for r in rows],
        "status": [r.status for r in rows],
        "error_type": [r.error_type for r in rows],
        "error_message": [r.error_message for r in rows],
        "outputs": [list(r.outputs) for r in rows],
        "voxels": [r.voxels for r in rows],
    }
    for stage in STAGES:
        columns[f"{stage}_s"] = [r.timings.get(stage) for r in rows]
    columns["statistics"] = [r.statistics for r in rows]
    columns["report"] = [r.report for r in rows]
    columns["answer"] = [r.answer for r in rows]
    columns["finished_at"] = [r.finished_at for r in rows]
    columns["attempt"] = [r.attempt for r in rows]
    return pa.table(columns, schema=_schema())


def parquet_bytes(table: Any) -> bytes:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _schema() -> Any:
    import pyarrow as pa

    text = pa.string()
    fields = [
        ("id", text),
        ("input", text),
        ("output", text),
        ("task", text),
        ("status", text),
        ("error_type", text),
        ("error_message", text),
        ("outputs", pa.list_(text)),
        ("voxels", pa.int64()),
        *((f"{stage}_s", pa.float64()) for stage in STAGES),
        ("statistics", text),
        ("report", text),
        ("answer", text),
        ("finished_at", text),
        ("attempt", text),
    ]
    return pa.schema(fields)
