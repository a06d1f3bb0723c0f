"""Benchmark: ``raytseg segment`` versus the ``TotalSegmentator`` CLI, same weights, same CT.

For each mode (``--fast``, and ``total`` unless ``--fast-only``) it measures, on the
realistic CT from ``make_realistic_ct.py`` and realistic-size synthetic weights:

- wall time, peak RSS of the largest process (the kernel's count) and peak PSS of the
  process tree (sampled each second) of a cold CLI run of each tool, multilabel output (``--ml``);
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
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
CACHE = OUT / "backend-cache"  # converted models (--backend openvino)
sys.path.insert(0, str(REPO / "bench"))

from make_realistic_ct import make  # noqa: E402


@dataclass
class Run:
    wall_s: float
    peak_rss_gb: float  # of the largest process of the tree (the kernel's ru_maxrss, as `time -v`)
    peak_tree_pss_gb: float  # summed over the process tree, shared pages split fairly


@dataclass
class Row:
    mode: str
    tool: str
    run: Run
    network_s: float

    def markdown(self) -> str:
        outside = 100 * (self.run.wall_s - self.network_s) / self.run.wall_s
        return (
            f"| {self.mode} | {self.tool} | {self.run.wall_s:.1f} | {self.run.peak_rss_gb:.2f} | "
            f"{self.run.peak_tree_pss_gb:.2f} | {self.network_s:.1f} | {outside:.0f} % |"
        )


def measure(cmd: list[str], env: dict[str, str]) -> Run:
    """Wall time, peak RSS of the main process and peak PSS of the whole process tree.

    The RSS peak is the kernel's (``wait4``'s ``ru_maxrss``), the PSS peak is sampled once a
    second: reading a process's smaps takes its memory-map lock, and sampling every 50 ms
    slowed the measured runs themselves (raytseg ``total``: 471 s sampled vs 320 s alone).
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, cwd=OUT, stdout=subprocess.DEVNULL, stderr=err)
        peak_pss = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_pss
            root = psutil.Process(proc.pid)
            while not done.wait(1.0):
                try:
                    procs = [root, *root.children(recursive=True)]
                    peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in procs if p.is_running()))
                except psutil.Error:
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{cmd[0]} failed:\n{err.read().decode()[-3000:]}")
    return Run(wall, usage.ru_maxrss * 1024 / 1e9, peak_pss / 1e9)


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


def segmenter(weights: Path, backend: str = "torch") -> Any:
    """A CPU Segmenter on ``weights``; openvino's converted models are cached under OUT."""
    from raytseg.config import Settings
    from raytseg.pipeline.model import configure_torch, select_device
    from raytseg.pipeline.run import Segmenter
    from raytseg.weights.store import WeightsStore

    env = {**os.environ, "RAYTSEG_WEIGHTS": str(weights), "RAYTSEG_CACHE_DIR": str(CACHE)}
    device = select_device("cpu")
    configure_torch(device)
    return Segmenter(WeightsStore(Settings.from_env(env)), device, backend=backend)


def bare_network_seconds(ct: Path, weights: Path, fast: bool, backend: str = "torch") -> float:
    """Sliding window alone (every model of the mode), on raytseg's preprocessed input:
    nnU-Net's own loop with torch, the lean CPU window with the converted network with
    openvino."""
    import torch

    from raytseg.pipeline import sliding_window
    from raytseg.pipeline.load import LoadLimits, load_volume
    from raytseg.pipeline.passes import prepare
    from raytseg.pipeline.plan import Pass, plan_run
    from raytseg.pipeline.records import SegmentOptions

    loader = segmenter(weights, backend)
    options = SegmentOptions(fast=fast)
    plan = plan_run(options)
    volume = load_volume(ct, LoadLimits.from_settings(loader.store.settings))
    plans = {f"{s.dataset_id}/{s.trainer_folder}": loader.plans(s) for s in plan.main.models}
    prepared = prepare(volume, Pass(plan, options), plans, None)
    total = 0.0
    for spec, item in zip(plan.main.models, prepared.inputs, strict=True):
        model = loader.model(spec)
        predictor = model._predictor
        predictor.tile_step_size = item.step_size
        data = torch.from_numpy(item.data)
        started = time.perf_counter()
        with torch.inference_mode():
            if model._openvino is None:
                predictor.predict_sliding_window_return_logits(data)
            else:
                with model._openvino.session() as features:
                    sliding_window.predict_logits(predictor, data, features)
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


def bench_mode(ct: Path, weights: Path, fast: bool, repeat: int) -> tuple[list[Row], str]:
    flags = ["--fast"] if fast else []
    mode = "total --fast" if fast else "total"
    env = {**os.environ, "RAYTSEG_WEIGHTS": str(weights), "TOTALSEG_HOME_DIR": str(ts_home(weights))}
    ours_out, theirs_out = OUT / "raytseg.nii.gz", OUT / "totalseg.nii.gz"
    raytseg_cmd = [str(REPO / ".venv/bin/raytseg"), "segment", "-i", str(ct), "-o", str(ours_out), "--ml"]
    ts_cmd = [str(REPO / ".venv-ref/bin/TotalSegmentator"), "-i", str(ct), "-o", str(theirs_out), "--ml"]
    ours = min((measure([*raytseg_cmd, *flags, "-d", "cpu", "-q"], env) for _ in range(repeat)), key=_wall)
    theirs = min((measure([*ts_cmd, *flags, "-d", "cpu", "-q"], env) for _ in range(repeat)), key=_wall)
    network = bare_network_seconds(ct, weights, fast)
    min_dice, differing = dice_report(ours_out, theirs_out)
    rows = [Row(mode, "raytseg", ours, network), Row(mode, "TotalSegmentator", theirs, network)]
    return rows, f"{mode}: min per-class Dice {min_dice:.5f}, {differing} voxels differ"


def _wall(run: Run) -> float:
    return run.wall_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast-only", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    ct = make(OUT / "realistic_ct.nii.gz")
    weights = weights_dir(args.fast_only)
    results = [bench_mode(ct, weights, True, args.repeat)]
    if not args.fast_only:
        results.append(bench_mode(ct, weights, False, 1))
    header = ["mode", "tool", "wall s", "peak RSS GB (largest process)", "peak PSS GB (tree)"]
    header += ["network s", "outside"]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|")
    for rows, _ in results:
        for row in rows:
            print(row.markdown())
    for _, identical in results:
        print(f"\n{identical}")


if __name__ == "__main__":
    main()
