"""Benchmark: the Serve app versus the in-process pipeline versus the bare network.

On the realistic CT (``make_realistic_ct.py``: 469 x 388 x 224 at 0.78 x 0.78 x 1.5 mm) with
realistic-size synthetic ``total --fast`` weights, all on this machine's CPUs:

- bare network: the model stage alone (``LoadedModel.predict``: sliding window + argmax),
  and the sliding window alone on the preprocessed input (torch: nnU-Net's own
  ``predict_sliding_window_return_logits``; openvino: the lean window with the converted
  network);
- in-process: ``load_volume(bytes)`` + ``Segmenter.segment`` + ``multilabel_nifti_bytes``,
  i.e. everything the service does for a request except HTTP and Ray;
- service: ``POST /v1/segment?fast=true`` on a local Ray (one replica per deployment,
  models on the CPU with all cores), warm (after one request), end to end from the client;
- throughput: 1, 2 and 4 clients, each sending ``--per-client`` requests back to back.

The three latencies are measured interleaved (bare, in-process, service, bare, ...) with
the service idle during the in-process runs, so a change in the machine's load (it may be
shared) affects all three alike. The service's per-call times come from Serve's access logs.

    .venv/bin/python bench/serve_bench.py [--repeat 3] [--per-client 2] [--json out.json]
        [--backend torch|openvino]

``--backend`` runs the in-process pipeline and the model replica with that backend
(openvino's converted models are cached in ``bench/out/backend-cache``, as backend_bench).

Prints JSON and a Markdown table. Takes ~10 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO / "bench"))

from make_realistic_ct import make  # noqa: E402


def weights_dir() -> Path:
    """Realistic-size synthetic weights for ``total --fast`` (and its 6 mm crop model)."""
    from raytseg.weights.synth import synthesize_task

    root = OUT / "serve-weights"
    marker = root / ".fast"
    if not marker.exists():
        synthesize_task("total", root, fast=True)
        marker.touch()
    return root


def timed(fn: Any, repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return runs


class InProcess:
    """The pipeline in this process, and the bare network on its preprocessed input."""

    def __init__(self, data: bytes, weights: Path, backend: str) -> None:
        from raytseg.config import Settings
        from raytseg.pipeline.load import LoadLimits, load_volume
        from raytseg.pipeline.model import configure_torch, select_device
        from raytseg.pipeline.passes import prepare
        from raytseg.pipeline.plan import Pass, plan_run
        from raytseg.pipeline.records import SegmentOptions
        from raytseg.pipeline.run import Segmenter
        from raytseg.weights.store import WeightsStore

        settings = Settings.from_env({**os.environ, "RAYTSEG_WEIGHTS": str(weights)})
        self.segmenter = Segmenter(WeightsStore(settings), select_device("cpu"), backend=backend)
        configure_torch(self.segmenter.device)
        self.data, self.options = data, SegmentOptions(fast=True)
        self.limits = LoadLimits.from_settings(settings)
        plan = plan_run(self.options)
        (spec,) = plan.main.models
        self.model = self.segmenter.model(spec)
        plans = {f"{spec.dataset_id}/{spec.trainer_folder}": self.segmenter.plans(spec)}
        (self.item,) = prepare(load_volume(data, self.limits), Pass(plan, self.options), plans, None).inputs

    def pipeline(self) -> bytes:
        """Everything the service does for a request, except HTTP and Ray."""
        from raytseg.pipeline.export import multilabel_nifti_bytes
        from raytseg.pipeline.load import load_volume

        volume = load_volume(self.data, self.limits)
        return multilabel_nifti_bytes(self.segmenter.segment(volume, self.options))

    def model_stage(self) -> None:
        """The model stage alone: sliding window + argmax (``LoadedModel.predict``)."""
        self.model.predict(self.item)

    def window(self) -> None:
        """The sliding window alone (logits only), as core_bench and backend_bench measure it."""
        import torch

        from raytseg.pipeline import sliding_window

        predictor, openvino = self.model._predictor, self.model._openvino
        predictor.tile_step_size = self.item.step_size
        data = torch.from_numpy(self.item.data)
        with torch.inference_mode():
            if openvino is None:
                predictor.predict_sliding_window_return_logits(data)
                return
            with openvino.session() as features:
                sliding_window.predict_logits(predictor, data, features)


def bench_config(weights: Path, backend: str = "torch", **changes: Any) -> Any:
    """One replica per deployment, models on the CPU; ``changes`` replace top-level keys."""
    from raytseg.serve.config import load_config

    one = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    return load_config(
        {
            "device": "cpu",
            "weights": str(weights),
            "tasks": {"total": {"modes": ["fast"]}},
            "models": {**one, "num_gpus": 0, "num_cpus": 1, "backend": backend},
            "pool": {"enabled": False, "num_gpus": 0},
            "preprocess": {**one, "num_cpus": 1},
            "postprocess": {**one, "num_cpus": 1},
            "jobs": {"enabled": False},
            "http": {"port": 8799},
            **changes,
        },
        {},
    )


def measure(data: bytes, weights: Path, backend: str, repeat: int, per_client: int) -> dict[str, Any]:
    """Latencies interleaved (bare, in-process, service, bare, ...) so load changes hit all three."""
    from raytseg.serve.local import start_local, stop_local

    local = InProcess(data, weights, backend)
    reference = local.pipeline()  # warm
    ray_dir = Path(tempfile.mkdtemp(prefix="rsb", dir="/tmp"))  # short: socket paths are limited
    config = bench_config(weights, backend)
    started = start_local(config, num_cpus=4, log_to_driver=False, _temp_dir=str(ray_dir))
    try:
        with httpx.Client(base_url=started.url, timeout=1800) as client:
            ids: list[str] = []

            def request() -> bytes:
                answer = client.post("/v1/segment", params={"fast": "true"}, content=data)
                answer.raise_for_status()
                ids.append(answer.headers["x-request-id"])
                return answer.content

            identical = request() == reference  # also warms every replica
            ids.clear()
            runs: dict[str, list[float]] = {"model_stage_s": [], "window_s": [], "pipeline_s": []}
            runs["latency_s"] = []
            for _ in range(repeat):
                runs["model_stage_s"] += timed(local.model_stage, 1)
                runs["window_s"] += timed(local.window, 1)
                runs["pipeline_s"] += timed(local.pipeline, 1)
                runs["latency_s"] += timed(request, 1)
        calls = _replica_calls(ray_dir, ids)
        throughput = {n: _throughput(started.url, data, n, per_client) for n in (1, 2, 4)}
        return {**runs, "service_calls_s": calls, "throughput": throughput, "identical_output": identical}
    finally:
        stop_local()
        shutil.rmtree(ray_dir, ignore_errors=True)


# Serve's access log line of a finished call: "... <request id> -- CALL predict OK 1234.5ms",
# or of the HTTP request in the ingress: "... <request id> -- POST /v1/segment 200 1234.5ms".
_LOG = re.compile(r"^\S+ \S+ \S+ app_(?P<who>\S+) \S+ (?P<request>\S+) -- (?P<what>.+) (?P<ms>[\d.]+)ms$")


def _replica_calls(ray_dir: Path, request_ids: list[str]) -> dict[str, list[float]]:
    """Seconds of each deployment call made for the given requests, from Serve's access logs."""
    wanted = set(request_ids)
    found: dict[str, list[float]] = {}
    for log in ray_dir.glob("session_2*/logs/serve/replica_*.log"):
        for line in log.read_text(errors="replace").splitlines():
            match = _LOG.match(line.replace(" raytseg_", " app_", 1))
            if match is None or match["request"] not in wanted:
                continue
            what = match["what"].replace("CALL ", "").replace(" OK", "")
            found.setdefault(f"{match['who']}.{what}", []).append(float(match["ms"]) / 1000)
    return found


def _throughput(url: str, data: bytes, clients: int, per_client: int) -> dict[str, float]:
    def client_loop(_: int) -> list[float]:
        times = []
        with httpx.Client(base_url=url, timeout=1800) as client:
            for _ in range(per_client):
                started = time.perf_counter()
                client.post("/v1/segment", params={"fast": "true"}, content=data).raise_for_status()
                times.append(time.perf_counter() - started)
        return times

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for times in pool.map(client_loop, range(clients)) for t in times]
    wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "wall_s": wall,
        "per_min": 60 * len(latencies) / wall,
        "median_latency_s": statistics.median(latencies),
    }


def table(results: dict[str, Any]) -> str:
    stage = statistics.median(results["model_stage_s"])
    window = statistics.median(results["window_s"])
    network = min(stage, window)
    pipeline = statistics.median(results["pipeline_s"])
    served = statistics.median(results["latency_s"])
    calls = results["service_calls_s"]
    stage_means = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in sorted(calls.items()))
    lines = [
        "| measurement | median s | vs bare network | vs in-process |",
        "|---|---|---|---|",
        f"| bare network (model stage) | {stage:.2f} | | |",
        f"| bare network (sliding window only) | {window:.2f} | | |",
        f"| in-process pipeline | {pipeline:.2f} | {pipeline / network:.2f}x | 1.00x |",
        f"| service, warm, end to end | {served:.2f} | {served / network:.2f}x | {served / pipeline:.2f}x |",
        "",
        f"Service calls per request (median s, from Serve's access logs): {stage_means}",
        "",
        "| clients | requests | wall s | requests/min | median latency s |",
        "|---|---|---|---|---|",
    ]
    for clients, t in results["throughput"].items():
        numbers = f"{t['wall_s']:.1f} | {t['per_min']:.2f} | {t['median_latency_s']:.2f}"
        lines.append(f"| {clients} | {t['requests']} | {numbers} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--backend", choices=("torch", "openvino"), default="torch")
    args = parser.parse_args()
    data = make(OUT / "realistic_ct.nii.gz").read_bytes()
    weights = weights_dir()
    os.environ["RAYTSEG_CACHE_DIR"] = str(OUT / "backend-cache")  # this process and Ray's workers
    load_before = os.getloadavg()
    results = {
        **measure(data, weights, args.backend, args.repeat, args.per_client),
        "backend": args.backend,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
