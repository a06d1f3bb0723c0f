"""Size and time of the DICOM outputs for the reference DICOM series, raytseg beside TotalSegmentator.

Input: the real TotalSegmentator 2.18 segmentation of ``example_ct_dicom`` shipped with the
reference data (``example_seg_dicom.nii.gz``, ``--fast --ml``), so the masks are real
anatomy, not synthetic-weight noise. For each output: bytes, seconds (best of 3), and the
count of dciodvfy errors when dciodvfy is installed. TotalSegmentator's writers
(``totalsegmentator.dicom_io``) run in ``.venv-ref`` on the same labels.

    .venv/bin/python bench/dicom_outputs_bench.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "data" / "totalseg-reference"
SERIES = REFERENCE / "example_ct_dicom"
LABELS = REFERENCE / "example_seg_dicom.nii.gz"

THEIRS = """
import json, sys, time
from pathlib import Path
import nibabel as nib, numpy as np
from totalsegmentator.dicom_io import save_mask_as_dicomseg, save_mask_as_rtstruct
from totalsegmentator.map_to_binary import class_map
series, labels_path, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
img = nib.load(labels_path)
labels = np.asarray(img.dataobj)
classes = class_map["total"]
result = {}
for name, write in (("seg", lambda p: save_mask_as_dicomseg(labels, classes, series, p, img.affine)),
                    ("rtstruct", lambda p: save_mask_as_rtstruct(labels, classes, series, p))):
    best = None
    for _ in range(3):
        started = time.perf_counter(); write(out / f"ts_{name}.dcm"); spent = time.perf_counter() - started
        best = spent if best is None else min(best, spent)
    result[name] = best
print(json.dumps(result))
"""


def _best_of_3(write: object) -> tuple[bytes, float]:
    best, data = float("inf"), b""
    for _ in range(3):
        started = time.perf_counter()
        data = write()  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return data, best


def _dciodvfy_errors(path: Path) -> int | None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        return None
    report = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return sum(line.startswith("Error") for line in (report.stdout + report.stderr).splitlines())


def main() -> None:
    from raytseg.pipeline.dicomseg import dicom_seg_bytes
    from raytseg.pipeline.dicomsource import dicom_source
    from raytseg.pipeline.labeltable import read_label_table
    from raytseg.pipeline.load import LoadLimits, load_volume
    from raytseg.pipeline.records import Segmentation
    from raytseg.pipeline.rtstruct import rtstruct_bytes

    volume = load_volume(str(SERIES), LoadLimits(max_voxels=10**9, max_archive_bytes=2**30))
    img = nib.load(LABELS)
    assert img.shape == volume.shape
    assert np.allclose(img.affine, volume.affine, atol=1e-4)
    labels = np.asarray(img.dataobj).astype(np.uint8)
    seg = Segmentation(labels, volume.affine, volume.header, read_label_table(img), "total")
    print(f"labels: {len(np.unique(labels)) - 1} classes present, shape {labels.shape}")
    writers = {
        "raytseg dicom_seg binary": lambda: dicom_seg_bytes(seg, dicom_source(seg, volume.series), "binary"),
        "raytseg dicom_seg labelmap": lambda: dicom_seg_bytes(
            seg, dicom_source(seg, volume.series), "labelmap"
        ),
        "raytseg dicom_rtstruct": lambda: rtstruct_bytes(seg, dicom_source(seg, volume.series)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = []
        for name, write in writers.items():
            data, seconds = _best_of_3(write)
            path = out / f"{name.replace(' ', '_')}.dcm"
            path.write_bytes(data)
            rows.append((name, len(data), seconds, _dciodvfy_errors(path)))
        ts_python = REPO / ".venv-ref" / "bin" / "python"
        done = subprocess.run(
            [str(ts_python), "-c", THEIRS, str(SERIES), str(LABELS), str(out)],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        )
        ts = json.loads(done.stdout.strip().splitlines()[-1])
        for name, key in (
            ("TotalSegmentator dicom_seg (binary)", "seg"),
            ("TotalSegmentator dicom_rtstruct", "rtstruct"),
        ):
            path = out / f"ts_{key}.dcm"
            rows.append((name, path.stat().st_size, ts[key], _dciodvfy_errors(path)))
    print("| output | bytes | seconds (best of 3) | dciodvfy errors |")
    print("|---|---:|---:|---:|")
    for name, size, seconds, errors in rows:
        print(f"| {name} | {size:,} | {seconds:.2f} | {'-' if errors is None else errors} |")


if __name__ == "__main__":
    sys.exit(main())
