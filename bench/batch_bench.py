"""Benchmark: ``raytseg batch`` versus a sequential loop of the TotalSegmentator CLI.

Both segment the same N realistic-size CTs with ``--fast`` on the CPU, with the same
realistic-size synthetic weights (``raytseg weights synth -t total --fast``, not --tiny):

- raytseg: one ``python -m raytseg.batch`` job (local Ray, started and stopped by the job,
  so its start-up is in the time);
- TotalSegmentator: ``TotalSegmentator -i ct_k.nii.gz -o out_k --fast -d cpu`` for k = 1..N,
  one after the other, with ``TOTALSEG_HOME_DIR`` pointing at a home whose nnunet/results
  is the same weights folder and whose config.json turns usage statistics off.

The CTs are ``make_realistic_ct.py``'s CT (469 x 388 x 224, 0.78 x 0.78 x 1.5 mm) with the
k-th copy shifted by k HU, so no two inputs are byte-identical. Reports volumes per hour
for both, the stage timings of the batch job, whether both tools wrote the same files
for the first CT, and the machine's load (other work on the machine skews both).

    .venv/bin/python bench/batch_bench.py [--n 8] [--skip-ts] [--backend openvino]
        [--batch-arg=--num-cpus=2 ...]

Writes bench/results/batch.md (and the raw figures to bench/out/batch/bench.json); with
``--backend openvino``, batch-openvino.md and bench-openvino.json. openvino's converted model
is cached in ``bench/out/backend-cache`` (as backend_bench) and converted before the job
starts: conversion is a deployment step, not part of a job.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "batch"
RESULTS = REPO / "bench" / "results"
CACHE = REPO / "bench" / "out" / "backend-cache"
sys.path.insert(0, str(REPO / "bench"))

from make_realistic_ct import make  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="Number of CTs.")
    parser.add_argument("--skip-ts", action="store_true", help="Reuse the last TotalSegmentator figures.")
    parser.add_argument("--batch-arg", action="append", default=[], help="Extra raytseg batch flag.")
    parser.add_argument("--backend", choices=("torch", "openvino"), default="torch")
    args = parser.parse_args()

    suffix = "" if args.backend == "torch" else f"-{args.backend}"
    raw, results = OUT / f"bench{suffix}.json", RESULTS / f"batch{suffix}.md"
    cts = inputs(args.n)
    weights = realistic_weights()
    if args.backend == "openvino":
        convert(weights)
    figures: dict[str, Any] = {"machine": machine(), "n": args.n, "ct_shape": list(nib.load(cts[0]).shape)}
    figures["batch"] = run_batch(cts[0].parent, weights, [*args.batch_arg, "--backend", args.backend])
    previous = json.loads(raw.read_text()) if raw.exists() else {}
    figures["ts"] = previous.get("ts") if args.skip_ts else run_ts_loop(cts, weights)
    first = cts[0].name.removesuffix(".nii.gz")
    figures["same_files"] = same_files(OUT / "batch_out" / first, OUT / "ts_out_1")
    raw.write_text(json.dumps(figures, indent=1))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(report(figures))
    print(results.read_text())


def inputs(n: int) -> list[Path]:
    """N variations of the realistic CT: copy k is shifted by k HU."""
    folder = OUT / f"cts_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    source = nib.load(make(REPO / "bench" / "out" / "realistic_ct.nii.gz"))
    data = np.asanyarray(source.dataobj)
    paths = []
    for k in range(1, n + 1):
        path = folder / f"ct_{k}.nii.gz"
        if not path.exists():
            nib.save(nib.Nifti1Image((data + k).astype(data.dtype), source.affine, source.header), path)
        paths.append(path)
    return paths


def realistic_weights() -> Path:
    from raytseg.weights.synth import synthesize_task

    root = OUT / "weights"
    if not (root / ".fast").exists():
        synthesize_task("total", root, fast=True)  # realistic size: not tiny
        (root / ".fast").write_text("")
    return root


def convert(weights: Path) -> None:
    """Fill the openvino cache with the job's models (a no-op when they are cached)."""
    from raytseg.config import Settings
    from raytseg.pipeline.model import select_device
    from raytseg.pipeline.plan import plan_run
    from raytseg.pipeline.records import SegmentOptions
    from raytseg.pipeline.run import Segmenter
    from raytseg.weights.store import WeightsStore

    env = {**os.environ, "RAYTSEG_WEIGHTS": str(weights), "RAYTSEG_CACHE_DIR": str(CACHE)}
    settings = Settings.from_env(env)
    segmenter = Segmenter(WeightsStore(settings), select_device("cpu"), backend="openvino")
    for spec in plan_run(SegmentOptions(fast=True)).main.models:
        segmenter.model(spec)


def run_batch(folder: Path, weights: Path, extra: list[str]) -> dict[str, Any]:
    out = OUT / "batch_out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [sys.executable, "-m", "raytseg.batch", "--input", str(folder), "--output", str(out)]
    command += ["--fast", "-d", "cpu", "-q", *extra]
    env = {**os.environ, "RAYTSEG_WEIGHTS": str(weights), "RAYTSEG_CACHE_DIR": str(CACHE)}
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"raytseg batch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = read_results(out / "_results.parquet")
    return {
        "command": " ".join(["raytseg batch", *command[3:]]),
        "wall_s": wall,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "statuses": sorted({row["status"] for row in rows}),
        "stages": {
            stage: [row[f"{stage}_s"] for row in rows]
            for stage in ("load", "preprocess", "model", "postprocess", "write", "total")
        },
        "finished_at": [row["finished_at"] for row in rows],
    }


def read_results(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(path.read_bytes())).to_pylist()
    return rows


def run_ts_loop(cts: list[Path], weights: Path) -> dict[str, Any]:
    home = ts_home(weights)
    cli = REPO / ".venv-ref" / "bin" / "TotalSegmentator"
    env = {**os.environ, "TOTALSEG_HOME_DIR": str(home)}
    env.pop("TOTALSEG_WEIGHTS_PATH", None)
    load_before = os.getloadavg()
    walls = []
    for k, ct in enumerate(cts, start=1):
        out = OUT / f"ts_out_{k}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        command = [str(cli), "-i", str(ct), "-o", str(out), "--fast", "-d", "cpu", "-q"]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"TotalSegmentator failed:\n{done.stderr[-3000:]}")
    return {
        "command": "TotalSegmentator -i ct_k.nii.gz -o ts_out_k --fast -d cpu -q  (k = 1..N, sequential)",
        "wall_s": sum(walls),
        "per_volume_s": walls,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def ts_home(weights: Path) -> Path:
    """A TotalSegmentator home whose nnunet/results is ``weights``; no usage statistics."""
    home = OUT / "tshome"
    (home / "nnunet").mkdir(parents=True, exist_ok=True)
    link = home / "nnunet" / "results"
    if not link.is_symlink():
        link.symlink_to(weights.resolve(), target_is_directory=True)
    config = {
        "totalseg_id": "totalseg_raytsegbench",
        "send_usage_stats": False,  # nothing leaves this machine
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    (home / "config.json").write_text(json.dumps(config))
    return home


def same_files(ours: Path, theirs: Path) -> dict[str, int]:
    """How many of TotalSegmentator's files raytseg wrote byte for byte (first CT)."""
    if not theirs.exists():
        return {}
    names = sorted(p.name for p in theirs.glob("*.nii.gz"))
    same = sum((ours / n).exists() and (ours / n).read_bytes() == (theirs / n).read_bytes() for n in names)
    return {"files": len(names), "identical": same}


def machine() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory, 1),
        "python": platform.python_version(),
    }  # noqa: E501


def report(f: dict[str, Any]) -> str:
    batch, ts, n = f["batch"], f["ts"], f["n"]
    per_hour = {name: 3600.0 * n / run["wall_s"] for name, run in (("batch", batch), ("ts", ts))}
    stages = batch["stages"]
    model_busy = sum(stages["model"]) / batch["wall_s"]
    cpu_stage_s = sum(sum(stages[s]) for s in ("load", "preprocess", "postprocess", "write"))
    m = f["machine"]
    lines = [
        "# Batch benchmark: `raytseg batch` vs a TotalSegmentator loop",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, no GPU; Python {m['python']}.",
        f"Inputs: {n} CTs of {' x '.join(map(str, f['ct_shape']))} voxels (0.78 x 0.78 x 1.5 mm, int16), "
        "`bench/make_realistic_ct.py`'s CT with copy k shifted by k HU.",
        "Weights: realistic-size synthetic `total --fast` weights (`raytseg weights synth -t total --fast`), "
        "the same folder for both tools.",
        "",
        "| | wall time | volumes / hour | load average before → after (1 min) |",
        "|---|---:|---:|---|",
        f"| `raytseg batch` (one job, Ray start-up in) | {batch['wall_s']:.0f} s | {per_hour['batch']:.0f} | "
        f"{batch['load_before'][0]:.1f} → {batch['load_after'][0]:.1f} |",
        f"| TotalSegmentator CLI, sequential loop | {ts['wall_s']:.0f} s | {per_hour['ts']:.0f} | "
        f"{ts['load_before'][0]:.1f} → {ts['load_after'][0]:.1f} |",
        "",
        f"**Speed-up: {per_hour['batch'] / per_hour['ts']:.2f}x** (targets: ≥ 3x, issue 4; ≥ 5x, issue 12).",
        "",
        "Commands:",
        "",
        f"- `{batch['command']}`",
        f"- `{ts['command']}`",
        "",
        "Batch stage seconds per item (median / max over the items; model = the network on the actor):",
        "",
        "| load | preprocess | model | postprocess | write (export + commit) | item total (incl. queueing) |",
        "|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(f"{np.median(stages[s]):.1f} / {max(stages[s]):.1f}" for s in
                         ("load", "preprocess", "model", "postprocess", "write", "total")) + " |",
        "",
        f"Overlap: the model actor was busy {100 * model_busy:.0f} % of the job's wall time; the CPU stages "
        f"added up to {cpu_stage_s:.0f} s and the model stage to {sum(stages['model']):.0f} s, against "
        f"{batch['wall_s']:.0f} s of wall time, so CPU and model stages ran on different items at once.",
        f"TotalSegmentator per volume: {', '.join(f'{s:.0f}' for s in ts['per_volume_s'])} s.",
    ]  # fmt: skip
    if f.get("same_files"):
        same = f["same_files"]
        lines.append(
            f"Same work: for the first CT, {same['identical']} of TotalSegmentator's {same['files']} files "
            "are byte-identical to raytseg's."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
