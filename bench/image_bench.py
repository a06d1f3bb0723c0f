"""Benchmark: raytseg's image built and started, on the Docker engine ``docker`` reaches.

1. Build: ``scripts/build-image.sh`` (a debootstrap base once, then the Dockerfile with pip
   offline from the runtime venv's lock); its size and the ``docker build`` seconds. With
   ``--fresh`` the image and its base are removed first, so the whole build is timed.
2. Time to ready: ``docker run`` of the image's own command (``raytseg serve``) with the
   fast ``total`` model's random weights mounted read-only, until ``GET /readyz`` answers
   200; ``--runs`` times, each a new container.

    DOCKER_HOST=unix:///path/docker.sock .venv/bin/python bench/image_bench.py [--fresh] [--runs 3]

TotalSegmentator ships no image to compare with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = (
    "tasks: {total: {modes: [fast]}}\npool: {enabled: false, num_gpus: 0}\njobs: {enabled: false}\n"
)


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


def build(fresh: bool) -> dict[str, object]:
    if fresh:
        subprocess.run(["docker", "rmi", "-f", "raytseg-base:bookworm"], capture_output=True)
    start = time.monotonic()
    script = ["bash", str(REPO / "scripts" / "build-image.sh")]
    out = subprocess.run(script, check=True, capture_output=True, text=True).stdout
    _, tag, size, build_s = out.strip().splitlines()[-1].split()
    return {
        "tag": tag,
        "size_gb": round(int(size) / 1e9, 2),
        "docker_build_s": int(build_s),
        "script_s": round(time.monotonic() - start, 1),  # with the base and the wheel download
    }


def mounts() -> Path:
    from raytseg.weights.synth import synthesize_task

    root = Path(tempfile.mkdtemp(prefix="raytseg-bench-", dir="/tmp"))
    synthesize_task("total", root / "weights", fast=True, tiny=True)
    (root / "config").mkdir()
    (root / "config" / "serve.yaml").write_text(SERVE_CONFIG)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def seconds_to_ready(tag: str, root: Path) -> float:
    start = time.monotonic()
    name = docker(
        "run",
        "-d",
        "--network=host",
        "--shm-size=1g",
        f"--volume={root / 'weights'}:/weights:ro",
        f"--volume={root / 'config'}:/config:ro",
        "--env=RAYTSEG_WEIGHTS=/weights",
        "--env=RAYTSEG_SERVE_CONFIG=/config/serve.yaml",
        tag,
    )
    try:
        while time.monotonic() - start < 900:
            try:
                if httpx.get("http://127.0.0.1:8000/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError("not ready after 900 s")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fresh", action="store_true", help="remove the base image first")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    report = build(args.fresh)
    root = mounts()
    try:
        ready = [seconds_to_ready(str(report["tag"]), root) for _ in range(args.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.update(ready_s=[round(s, 1) for s in ready], ready_median_s=round(statistics.median(ready), 1))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
