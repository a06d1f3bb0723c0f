"""Benchmark: ``raytseg segment`` versus the ``TotalSegmentator`` CLI, same weights, same CT.

For each mode (``--fast``, and ``total`` unless ``--fast-only``) it measures, on the
realistic CT from ``make_realistic_ct.py`` and realistic-size synthetic weights:

- wall time and peak RSS (summed over the process tree, sampled every 50 ms) of a cold
  CLI run of each tool, multilabel output (``--ml``);
- the bare network time: nnU-Net's sliding window alone, on the exact preprocessed input;
- whether both tools wrote the same masks (per-class Dice).

    .venv/bin/python bench/core_bench.py [--fast-only] [--repeat N]

Needs ``.venv-ref`` (scripts/setup-reference-env.sh). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO / "bench"))

from make_realistic_ct import make  # noqa: E402


@dataclass
class Run:
    wall_s: float
    peak_rss_gb: float


def measure(cmd: list[str], env: dict[str, str]) -> Run:
    """Wall time and peak RSS of the whole process tree of ``cmd``."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=OUT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err.decode()[-3000:]}")
    return Run(time.perf_counter() - started, peak / 1e9)


def weights_dir(fast_only: bool) -> Path:
    from raytseg.weights.synth import synthesize_task

    root = OUT / "weights"
    marker = root / (".fast" if fast_only else ".all")
    if not marker.exists():
        synthesize_task("total", root, fast=True)
        if not fast_only:
            synthesize_task("total", root)
        marker.touch()
    return root


def ts_home(weights: Path) -> Path:
    home = OUT / "tshome"
    (home / "nnunet").mkdir(parents=True, exist_ok=True)
    link = home / "nnunet" / "results"
    if not link.exists():
        link.symlink_to(weights, target_is_directory=True)
    config = {"totalseg_id": "totalseg_bench", "send_usage_stats": False, "statistics_disclaimer_shown": True}
    (home / "config.json").write_text(json.dumps(config))
    return home


def bare_network_seconds(ct: Path, weights: Path, fast: bool) -> float:
    """Sliding window alone (every model of the mode), on raytseg's preprocessed input."""
    import torch

    from raytseg.config import Settings
    from raytseg.pipeline.load import LoadLimits, load_volume
    from raytseg.pipeline.model import configure_torch_threads, select_device
    from raytseg.pipeline.plan import plan_run
    from raytseg.pipeline.records import SegmentOptions
    from raytseg.pipeline.run import Segmenter, prepare
    from raytseg.weights.store import WeightsStore

    settings = Settings.from_env({**os.environ, "RAYTSEG_WEIGHTS": str(weights)})
    segmenter = Segmenter(WeightsStore(settings), select_device("cpu"))
    configure_torch_threads(segmenter.device)
    plan = plan_run(SegmentOptions(fast=fast))
    volume = load_volume(ct, LoadLimits.from_settings(settings))
    plans = {f"{s.dataset_id}/{s.trainer_folder}": segmenter.plans(s) for s in plan.main.models}
    prepared = prepare(volume, plan, plans, None)
    total = 0.0
    for spec, item in zip(plan.main.models, prepared.inputs, strict=True):
        predictor = segmenter.model(spec)._predictor
        predictor.tile_step_size = item.step_size
        started = time.perf_counter()
        with torch.inference_mode():
            predictor.predict_sliding_window_return_logits(torch.from_numpy(item.data))
        total += time.perf_counter() - started
    return total


def dice_report(ours: Path, theirs: Path) -> tuple[float, int]:
    a, b = np.asanyarray(nib.load(ours).dataobj), np.asanyarray(nib.load(theirs).dataobj)
    scores = []
    for label in np.union1d(np.unique(a), np.unique(b)):
        if label == 0:
            continue
        x, y = a == label, b == label
        scores.append(2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(min(scores)) if scores else 1.0, int((a != b).sum())


def bench_mode(ct: Path, weights: Path, fast: bool, repeat: int) -> dict[str, object]:
    flags = ["--fast"] if fast else []
    env = {**os.environ, "RAYTSEG_WEIGHTS": str(weights), "TOTALSEG_HOME_DIR": str(ts_home(weights))}
    ours_out, theirs_out = OUT / "raytseg.nii.gz", OUT / "totalseg.nii.gz"
    raytseg_cmd = [str(REPO / ".venv/bin/raytseg"), "segment", "-i", str(ct), "-o", str(ours_out), "--ml"]
    ts_cmd = [str(REPO / ".venv-ref/bin/TotalSegmentator"), "-i", str(ct), "-o", str(theirs_out), "--ml"]
    ours = [measure([*raytseg_cmd, *flags, "-d", "cpu", "-q"], env) for _ in range(repeat)]
    theirs = [measure([*ts_cmd, *flags, "-d", "cpu", "-q"], env) for _ in range(repeat)]
    network = bare_network_seconds(ct, weights, fast)
    min_dice, differing = dice_report(ours_out, theirs_out)
    return {
        "mode": "total --fast" if fast else "total",
        "raytseg_wall_s": min(r.wall_s for r in ours),
        "raytseg_peak_rss_gb": max(r.peak_rss_gb for r in ours),
        "totalseg_wall_s": min(r.wall_s for r in theirs),
        "totalseg_peak_rss_gb": max(r.peak_rss_gb for r in theirs),
        "network_s": network,
        "min_dice": min_dice,
        "differing_voxels": differing,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast-only", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    ct = make(OUT / "realistic_ct.nii.gz")
    weights = weights_dir(args.fast_only)
    rows = [bench_mode(ct, weights, True, args.repeat)]
    if not args.fast_only:
        rows.append(bench_mode(ct, weights, False, 1))
    print(json.dumps(rows, indent=1))
    print("\n| mode | tool | wall s | peak RSS GB | bare network s | outside network |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for tool in ("raytseg", "totalseg"):
            wall = float(r[f"{tool}_wall_s"])  # type: ignore[arg-type]
            net = float(r["network_s"])  # type: ignore[arg-type]
            print(
                f"| {r['mode']} | {tool} | {wall:.1f} | {float(r[f'{tool}_peak_rss_gb']):.2f} | "  # type: ignore[arg-type]
                f"{net:.1f} | {100 * (wall - net) / wall:.0f} % |"
            )
        print(f"| {r['mode']} | identical? | min Dice {r['min_dice']:.5f}, {r['differing_voxels']} voxels differ |||||")


if __name__ == "__main__":
    main()
