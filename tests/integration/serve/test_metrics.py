"""raytseg's metrics reach the node's Prometheus endpoint (Ray's metrics agent) after requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx


def test_metrics_after_requests(
    api: httpx.Client,
    tiny_ct: bytes,
    metrics: Callable[[], Any],
    metric_total: Callable[..., float],
    waiter: Callable[..., None],
) -> None:
    assert api.post("/v1/segment", params={"fast": "true"}, content=tiny_ct).status_code == 200
    assert api.post("/v1/segment", params={"fast": "true"}, content=b"junk" * 100).status_code == 400

    def exported() -> bool:
        samples = metrics()
        return (
            metric_total(samples, "ray_raytseg_requests_total", task="total", outcome="ok", entrypoint="http")
            >= 1
            and metric_total(samples, "ray_raytseg_errors_total", error_type="UnreadableImageError") >= 1
            and metric_total(samples, "ray_raytseg_stage_seconds_count", stage="postprocess") >= 1
        )

    waiter(exported, 30, "raytseg metrics on the metrics endpoint")
    samples = metrics()
    for stage in ("load", "preprocess", "model", "postprocess", "export", "end_to_end"):
        assert metric_total(samples, "ray_raytseg_stage_seconds_count", task="total", stage=stage) >= 1, stage
    top = metric_total(samples, "ray_raytseg_stage_seconds_bucket", stage="end_to_end", le="1800.0")
    assert top == metric_total(samples, "ray_raytseg_stage_seconds_count", stage="end_to_end")
    assert metric_total(samples, "ray_raytseg_voxels_processed_total", task="total") >= 24 * 24 * 10
    assert metric_total(samples, "ray_raytseg_model_load_seconds_count") >= 1
    assert any(name == "ray_raytseg_queue_depth" for name, _ in samples)
