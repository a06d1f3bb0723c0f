"""Benchmark of the model stage's backends on the CPU: torch versus openvino, with
TotalSegmentator's CLI beside them on the same CT and weights.

On the realistic CT from ``make_realistic_ct.py`` and realistic-size synthetic weights, for
``--fast`` (and ``total`` with ``--total``), it measures:

- cold CLI runs (``--ml``) of TotalSegmentator, of raytseg with torch, with openvino and an
  empty cache (the conversion included), and with openvino again (from its cache): wall
  time, peak RSS, and each raytseg output's min per-class Dice against TotalSegmentator's
  (random weights: near-tied logits, the hardest case);
- loading every model of the mode with openvino from the cache, in-process;
- the bare sliding window of each backend on raytseg's preprocessed input (torch: nnU-Net's
  loop, as bench/core_bench.py; openvino: the lean CPU window with the converted network).

    .venv/bin/python bench/backend_bench.py [--total]

Needs ``.venv-ref`` (scripts/setup-reference-env.sh). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from core_bench import (  # noqa: E402
    CACHE,
    OUT,
    Run,
    bare_network_seconds,
    dice_report,
    measure,
    segmenter,
    ts_home,
    weights_dir,
)
from make_realistic_ct import make  # noqa: E402

BACKENDS = ("torch", "openvino")


def load_seconds(weights: Path, fast: bool) -> float:
    """Seconds to load every model of the mode with openvino from the (filled) cache."""
    from raytseg.pipeline.plan import plan_run
    from raytseg.pipeline.records import SegmentOptions

    loader = segmenter(weights, "openvino")
    started = time.perf_counter()
    for spec in plan_run(SegmentOptions(fast=fast)).main.models:
        loader.model(spec)
    return time.perf_counter() - started


def cli_runs(ct: Path, weights: Path, fast: bool) -> list[tuple[str, Run, str]]:
    """Cold CLI runs, before this process loads anything (a forked child's peak RSS counts
    its parent's pages until it execs): TotalSegmentator, torch, openvino before the mode's
    models are cached (conversion included) and from the cache; (tool, run, Dice note)."""
    flags = ["--fast", "-d", "cpu", "-q"] if fast else ["-d", "cpu", "-q"]
    env = {
        **os.environ,
        "RAYTSEG_WEIGHTS": str(weights),
        "RAYTSEG_CACHE_DIR": str(CACHE),
        "TOTALSEG_HOME_DIR": str(ts_home(weights)),
    }
    theirs = OUT / "totalseg.nii.gz"
    ts_cmd = [str(REPO / ".venv-ref/bin/TotalSegmentator"), "-i", str(ct), "-o", str(theirs), "--ml"]
    rows = [("TotalSegmentator", measure([*ts_cmd, *flags], env), "")]
    for backend, tool in [
        ("torch", "raytseg --backend torch"),
        ("openvino", "raytseg --backend openvino, empty cache"),
        ("openvino", "raytseg --backend openvino"),
    ]:
        ours = OUT / f"raytseg-{backend}.nii.gz"
        cmd = [str(REPO / ".venv/bin/raytseg"), "segment", "-i", str(ct), "-o", str(ours), "--ml"]
        run = measure([*cmd, *flags, "--backend", backend], env)
        min_dice, differing = dice_report(ours, theirs)
        rows.append((tool, run, f"{min_dice:.5f} ({differing} voxels differ)"))
    return rows


def report(ct: Path, weights: Path, fast: bool, runs: list[tuple[str, Run, str]]) -> list[str]:
    """The CLI runs of a mode, with its in-process load and sliding-window times."""
    mode = "total --fast" if fast else "total"
    cached = load_seconds(weights, fast)
    windows = {backend: bare_network_seconds(ct, weights, fast, backend) for backend in BACKENDS}
    lines = [
        f"\n{mode}: loading every model with openvino from the cache: {cached:.1f} s",
        f"{mode}: bare sliding windows: "
        + ", ".join(f"{b} {s:.1f} s" for b, s in windows.items())
        + f" ({windows['torch'] / windows['openvino']:.2f}x)",
        "",
        "| mode | tool | wall s | peak RSS GB (largest process) | min per-class Dice vs TotalSegmentator |",
        "|---|---|---|---|---|",
    ]
    for tool, run, dice in runs:
        lines.append(f"| {mode} | {tool} | {run.wall_s:.1f} | {run.peak_rss_gb:.2f} | {dice} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total", action="store_true", help="Also the five-model total mode.")
    args = parser.parse_args()
    ct = make(OUT / "realistic_ct.nii.gz")
    weights = weights_dir(not args.total)
    modes = (True, False) if args.total else (True,)
    shutil.rmtree(CACHE, ignore_errors=True)  # once: the modes share no model
    runs = {fast: cli_runs(ct, weights, fast) for fast in modes}  # first: see cli_runs
    for fast in modes:
        print("\n".join(report(ct, weights, fast, runs[fast])), flush=True)


if __name__ == "__main__":
    main()
