"""Fidelity of ``--backend openvino``: per-class Dice against TotalSegmentator 2.18 on every
parity case of tests/reference/test_parity.py (same images, flags and tiny random weights).

Random weights are the hardest case for a backend whose logits differ in the last bits:
their classes are nearly tied in many voxels, where real weights have wide margins. The
``auto`` backend may pick openvino on a CPU only if the minimum here is >= 0.999
(``raytseg.pipeline.backends.AUTO_ON_CPU``).

    .venv/bin/python bench/backend_fidelity.py

Needs ``.venv-ref`` (scripts/setup-reference-env.sh). Prints a Markdown table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "data" / "totalseg-reference"

TASKS = {"total": ("default", "fast"), "total_mr": ("default", "fast"), "body": ("default", "fast")}


def parity_cases() -> dict[str, tuple[str, tuple[str, ...], bool]]:
    """``{case: (image, flags, multilabel)}`` of tests/reference/test_parity.py."""
    spec = importlib.util.spec_from_file_location("test_parity", REPO / "tests/reference/test_parity.py")
    assert spec is not None
    assert spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    cases = {name: (*case, True) for name, case in module.ML_CASES.items()}
    return cases | {name: (*case, False) for name, case in module.FOLDER_CASES.items()}


def synthesize(root: Path) -> None:
    from raytseg.weights.synth import synthesize_task

    for task, modes in TASKS.items():
        for mode in modes:
            synthesize_task(task, root, fast=mode == "fast", tiny=True)


def ts_home(root: Path, weights: Path) -> Path:
    home = root / "tshome"
    (home / "nnunet").mkdir(parents=True)
    (home / "nnunet" / "results").symlink_to(weights, target_is_directory=True)
    config = {"totalseg_id": "totalseg_bench", "send_usage_stats": False, "statistics_disclaimer_shown": True}
    (home / "config.json").write_text(json.dumps(config))
    return home


def run(
    tool: list[str], image: Path, out: Path, flags: tuple[str, ...], ml: bool, env: dict[str, str]
) -> Path:
    target = out / "seg.nii.gz" if ml else out
    out.mkdir(parents=True)  # TotalSegmentator writes --ml statistics beside the file, unmade
    cmd = [*tool, "-i", str(image), "-o", str(target), "-d", "cpu", "-q", *flags, *(["--ml"] if ml else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return target


def class_masks(path: Path) -> dict[str, np.ndarray]:
    """``{class: mask}`` of a multilabel file (its label table) or a folder of per-class files."""
    from raytseg.pipeline.labeltable import read_label_table

    if path.is_dir():
        return {p.name: np.asanyarray(nib.load(p).dataobj) > 0 for p in sorted(path.glob("*.nii.gz"))}
    image = nib.load(path)
    labels = np.asanyarray(image.dataobj)
    return {name: labels == value for value, name in read_label_table(image).items()}


def min_dice(ours: Path, theirs: Path) -> tuple[float, str, int]:
    """(lowest per-class Dice, its class, voxels that differ over all classes)."""
    a, b = class_masks(ours), class_masks(theirs)
    assert sorted(a) == sorted(b), f"different classes: {sorted(set(a) ^ set(b))}"
    scores, differing = {}, 0
    for name in a:
        total = int(a[name].sum()) + int(b[name].sum())
        scores[name] = 1.0 if total == 0 else 2.0 * int((a[name] & b[name]).sum()) / total
        differing += int((a[name] != b[name]).sum())
    worst = min(scores, key=scores.__getitem__)
    return scores[worst], worst, differing


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="backend-fidelity-"))
    weights = root / "weights"
    synthesize(weights)
    env = {
        **os.environ,
        "RAYTSEG_WEIGHTS": str(weights),
        "RAYTSEG_CACHE_DIR": str(root / "cache"),
        "TOTALSEG_HOME_DIR": str(ts_home(root, weights)),
    }
    ours_cli = [str(REPO / ".venv/bin/raytseg"), "segment", "--backend", "openvino"]
    theirs_cli = [str(REPO / ".venv-ref/bin/TotalSegmentator")]
    print("| case | flags | min per-class Dice | class | voxels differing (all classes) |")
    print("|---|---|---|---|---|")
    worst = 1.0
    for case, (image, flags, ml) in parity_cases().items():
        theirs = run(theirs_cli, REFERENCE / image, root / case / "theirs", flags, ml, env)
        ours = run(ours_cli, REFERENCE / image, root / case / "ours", flags, ml, env)
        dice, name, differing = min_dice(ours, theirs)
        worst = min(worst, dice)
        print(f"| {case} | `{' '.join(flags)}` | {dice:.5f} | {name} | {differing} |", flush=True)
    print(f"\nminimum over all cases: {worst:.5f} (auto may pick openvino only at >= 0.999)")


if __name__ == "__main__":
    main()
