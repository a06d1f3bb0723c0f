"""Benchmark: a local service driven at 4x its measured capacity for 2 minutes.

The app serves ``total --fast`` with realistic-size synthetic weights on this machine's
CPUs (two ingress replicas, as the chart deploys, one replica per other deployment), with
``limits.max_queued_requests`` 8 for the whole app. Uploads are the example CT
(122 x 101 x 30 at 3 mm).

1. Capacity: 8 clients send requests back to back for ``--capacity-s`` seconds (the queue
   limit, never refused); capacity = answered requests / s.
2. Overload: requests arrive at 4x that rate (fixed intervals, each on its own connection,
   no client-side retry) for ``--overload-s`` seconds.
3. Afterwards: ``/readyz`` and one more request.

Reported: answers by status (each refusal must carry ``Retry-After``), latency percentiles
of the admitted requests and of the refusals, and the peak RSS of every process of the
local Ray session (sampled every 0.5 s), by Ray's process title.

    .venv/bin/python bench/overload_bench.py [--capacity-s 30] [--overload-s 120] [--json out.json]

TotalSegmentator has no service to compare with; this measures raytseg's admission alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from serve_bench import bench_config, weights_dir  # noqa: E402

CT = REPO / "examples" / "data" / "example_ct_sm.nii.gz"
MAX_QUEUED = 8
OVERLOAD = 4.0


@dataclass
class Answer:
    status: int
    seconds: float
    retry_after: str | None


@dataclass
class PeakRss:
    """The largest resident set of each process of the Ray session, sampled in a thread."""

    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample_until_stopped(self, ray_dir: Path) -> threading.Thread:
        def run() -> None:
            while not self._stop.wait(0.5):
                self._sample(str(ray_dir))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _sample(self, session: str) -> None:
        import psutil

        for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if session not in cmdline and not cmdline.startswith("ray::"):
                continue
            # Ray retitles a worker with the method it runs ("ray::ServeReplica:app:Ingress.check_health")
            name = (
                cmdline.split()[0].split(".")[0]
                if cmdline.startswith("ray::")
                else Path(cmdline.split()[0]).name
            )
            key = f"{name} (pid {process.info['pid']})"
            rss = process.info["memory_info"].rss if process.info["memory_info"] else 0
            self.peaks[key] = max(self.peaks.get(key, 0), rss)


def post(client: httpx.Client, data: bytes) -> Answer:
    started = time.perf_counter()
    answer = client.post("/v1/segment", params={"fast": "true"}, content=data)
    return Answer(answer.status_code, time.perf_counter() - started, answer.headers.get("retry-after"))


def capacity(url: str, data: bytes, seconds: float) -> float:
    """Requests answered per second by ``MAX_QUEUED`` clients sending back to back."""
    deadline = time.monotonic() + seconds

    def client_loop(_: int) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=600) as client:
            while time.monotonic() < deadline:
                if post(client, data).status == 200:
                    done += 1
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(MAX_QUEUED) as pool:
        answered = sum(pool.map(client_loop, range(MAX_QUEUED)))
    return answered / (time.perf_counter() - started)


def overload(url: str, data: bytes, rate: float, seconds: float) -> list[Answer]:
    """Requests at ``rate`` per second for ``seconds``, each on a connection of its own."""

    def one(_: int) -> Answer:
        with httpx.Client(base_url=url, timeout=600) as client:
            return post(client, data)

    count, futures = int(rate * seconds), []
    with ThreadPoolExecutor(max(64, int(rate * 60))) as pool:
        started = time.monotonic()
        for n in range(count):
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
            futures.append(pool.submit(one, n))
        return [f.result() for f in futures]


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0], "p99": values[0]} if values else {}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[94], "p99": cuts[98], "max": max(values)}


def measure(capacity_s: float, overload_s: float) -> dict[str, Any]:
    from raytseg.serve.local import start_local, stop_local

    data = CT.read_bytes()
    ray_dir = Path(tempfile.mkdtemp(prefix="rso", dir="/tmp"))
    rss = PeakRss()
    config = bench_config(
        weights_dir(),
        ingress={"num_replicas": 2, "num_cpus": 0.25},
        limits={"max_queued_requests": MAX_QUEUED, "retry_after_s": 5},
        http={"port": 8798},
    )
    started = start_local(config, num_cpus=4, log_to_driver=False, _temp_dir=str(ray_dir))
    sampler = rss.sample_until_stopped(ray_dir)
    try:
        with httpx.Client(base_url=started.url, timeout=600) as client:
            assert post(client, data).status == 200  # warm every replica
        rate = capacity(started.url, data, capacity_s)
        answers = overload(started.url, data, OVERLOAD * rate, overload_s)
        with httpx.Client(base_url=started.url, timeout=600) as client:
            ready_after = client.get("/readyz").status_code
            last = post(client, data).status
        return report(rate, answers, ready_after, last, rss)
    finally:
        rss.stop()
        sampler.join()
        stop_local()
        shutil.rmtree(ray_dir, ignore_errors=True)


def report(rate: float, answers: list[Answer], ready_after: int, last: int, rss: PeakRss) -> dict[str, Any]:
    refused = [a for a in answers if a.status in (429, 503)]
    return {
        "capacity_per_s": rate,
        "offered_per_s": OVERLOAD * rate,
        "requests": len(answers),
        "by_status": dict(sorted(Counter(a.status for a in answers).items())),
        "refusals_with_retry_after": sum(a.retry_after is not None for a in refused),
        "admitted_latency_s": percentiles([a.seconds for a in answers if a.status == 200]),
        "refused_latency_s": percentiles([a.seconds for a in refused]),
        "readyz_after": ready_after,
        "request_after": last,
        "peak_rss_mb": {k: round(v / 2**20) for k, v in sorted(rss.peaks.items(), key=lambda kv: -kv[1])},
    }


def table(result: dict[str, Any]) -> str:
    admitted, refused = result["admitted_latency_s"], result["refused_latency_s"]
    lines = [
        f"Capacity {result['capacity_per_s']:.2f} requests/s; offered {result['offered_per_s']:.2f}/s "
        f"for {result['requests']} requests.",
        "",
        "| answers | count |",
        "|---|---|",
        *(f"| {status} | {count} |" for status, count in result["by_status"].items()),
        "",
        f"Refusals with Retry-After: {result['refusals_with_retry_after']}. "
        f"After the run: /readyz {result['readyz_after']}, a request {result['request_after']}.",
        "",
        "| latency s | p50 | p95 | p99 | max |",
        "|---|---|---|---|---|",
    ]
    for name, values in (("admitted (200)", admitted), ("refused (503)", refused)):
        cells = " | ".join(f"{values.get(k, float('nan')):.3f}" for k in ("p50", "p95", "p99", "max"))
        lines.append(f"| {name} | {cells} |")
    lines += ["", "| process | peak RSS MB |", "|---|---|"]
    lines += [f"| {name} | {mb} |" for name, mb in result["peak_rss_mb"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--overload-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.capacity_s, args.overload_s)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
