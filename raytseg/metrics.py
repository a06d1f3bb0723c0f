"""Every Prometheus metric raytseg exports, defined in one place.

The metrics are ``ray.util.metrics`` objects, created lazily in the process that records
them (Serve replicas, Ray Data workers), so each node's Ray metrics agent exports them
with the rest of Ray's metrics: on the port given by ``ray start --metrics-export-port``
(KubeRay: 8080, container port ``metrics``). Ray prefixes names with ``ray_`` and counters
get ``_total``: ``raytseg_requests`` is scraped as ``ray_raytseg_requests_total``.

Tags are fixed, low-cardinality keys (task, stage, outcome...), never request ids.
Importing this module imports neither Ray nor anything heavy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

# Segmentations run from seconds (--fast on a GPU) to half an hour (total on a CPU).
STAGE_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0)
MODEL_LOAD_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        """The name Prometheus sees (histograms add _bucket/_sum/_count to it)."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


REQUESTS = MetricSpec(
    "raytseg_requests",
    "counter",
    "Segmentations finished, by task, outcome (ok, failed, skipped) and entrypoint (http, job, batch).",
    ("task", "outcome", "entrypoint"),
)
ERRORS = MetricSpec(
    "raytseg_errors",
    "counter",
    "Failed segmentations by task and error type (a class of raytseg.errors, or Internal).",
    ("task", "error_type", "entrypoint"),
)
STAGE_SECONDS = MetricSpec(
    "raytseg_stage_seconds",
    "histogram",
    "Seconds per pipeline stage (load, preprocess, model, postprocess, export, end_to_end; "
    "crop_preprocess, crop_model, crop_postprocess for the crop pass of the service).",
    ("task", "stage", "entrypoint"),
    STAGE_BUCKETS_S,
)
VOXELS = MetricSpec(
    "raytseg_voxels_processed",
    "counter",
    "Input voxels segmented, by task.",
    ("task", "entrypoint"),
)
QUEUE_DEPTH = MetricSpec(
    "raytseg_queue_depth",
    "gauge",
    "Segmentations accepted but not finished (queued or running), per entrypoint.",
    ("entrypoint",),
)
MODEL_LOAD_SECONDS = MetricSpec(
    "raytseg_model_load_seconds",
    "histogram",
    "Seconds to build a network and load its weights, by model.",
    ("model",),
    MODEL_LOAD_BUCKETS_S,
)
ALL = (REQUESTS, ERRORS, STAGE_SECONDS, VOXELS, QUEUE_DEPTH, MODEL_LOAD_SECONDS)


class Recorder:
    """Records raytseg metrics in this process (metric objects are created on first use)."""

    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()

    def request(self, task: str, outcome: str, entrypoint: str) -> None:
        self._get(REQUESTS).inc(1, tags={"task": task, "outcome": outcome, "entrypoint": entrypoint})

    def error(self, task: str, error_type: str, entrypoint: str) -> None:
        self._get(ERRORS).inc(1, tags={"task": task, "error_type": error_type, "entrypoint": entrypoint})

    def stage(self, task: str, stage: str, seconds: float, entrypoint: str) -> None:
        tags = {"task": task, "stage": stage, "entrypoint": entrypoint}
        self._get(STAGE_SECONDS).observe(seconds, tags=tags)

    def voxels(self, task: str, count: int, entrypoint: str) -> None:
        self._get(VOXELS).inc(count, tags={"task": task, "entrypoint": entrypoint})

    def queue_depth(self, depth: int, entrypoint: str) -> None:
        self._get(QUEUE_DEPTH).set(depth, tags={"entrypoint": entrypoint})

    def model_load(self, model: str, seconds: float) -> None:
        self._get(MODEL_LOAD_SECONDS).observe(seconds, tags={"model": model})

    def _get(self, spec: MetricSpec) -> Any:
        with self._lock:
            if spec.name not in self._metrics:
                self._metrics[spec.name] = _create(spec)
            return self._metrics[spec.name]


def _create(spec: MetricSpec) -> Any:
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    return metrics.Histogram(
        spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
    )


_RECORDER: Recorder | None = None
_RECORDER_LOCK = threading.Lock()


def recorder() -> Recorder:
    """This process's recorder."""
    global _RECORDER
    with _RECORDER_LOCK:
        if _RECORDER is None:
            _RECORDER = Recorder()
        return _RECORDER
