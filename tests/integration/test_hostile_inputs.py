"""Bombs are refused before they are expanded: the CLI's peak memory stays under 1 GB.

Each case runs ``raytseg segment`` in a fresh process with the default limits and reads
that process's peak RSS (``ru_maxrss`` of the only child of a small wrapper).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

GIB = 1 << 30
PEAK_LIMIT_KB = 1024 * 1024  # 1 GiB
WRAPPER = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "print(done.stderr, file=sys.stderr)\n"
)


def _segment(source: Path, tmp_path: Path) -> tuple[int, int, str]:
    """(exit status, peak RSS in KiB, stderr) of ``raytseg segment -i source``."""
    cli = [sys.executable, "-m", "raytseg.cli", "segment", "-i", str(source), "-o", str(tmp_path / "out")]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAYTSEG_WEIGHTS": str(tmp_path / "no-weights")}
    run = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cli, "-d", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    status, peak = run.stdout.split()
    return int(status), int(peak), run.stderr


def test_a_zip_with_one_huge_member_among_real_slices(tmp_path: Path, dicom_zip_bomb: Path) -> None:
    assert dicom_zip_bomb.stat().st_size < 10 << 20  # a small upload...
    status, peak_kb, stderr = _segment(dicom_zip_bomb, tmp_path)
    assert status == 1, stderr
    assert "zz_padding.dcm" in stderr  # ...refused by name, before its 3 GiB are expanded
    assert peak_kb < PEAK_LIMIT_KB, f"peak RSS {peak_kb / 1024:.0f} MiB"


def test_a_nifti_whose_header_claims_too_many_voxels(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    bomb = tmp_path / "huge.nii.gz"
    bomb.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + bytes(1 << 20)))
    status, peak_kb, stderr = _segment(bomb, tmp_path)
    assert status == 1, stderr
    assert "voxels" in stderr
    assert peak_kb < PEAK_LIMIT_KB, f"peak RSS {peak_kb / 1024:.0f} MiB"


@pytest.mark.parametrize("trailing_gib", [3])
def test_a_small_nifti_followed_by_gigabytes_of_gzip(tmp_path: Path, trailing_gib: int) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((16, 16, 16))
    header.set_data_dtype(np.int16)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
    parts = [deflate.compress(header.binaryblock + b"\0" * 4 + bytes(16 * 16 * 16 * 2))]
    chunk = bytes(64 << 20)
    parts += [deflate.compress(chunk) for _ in range(trailing_gib * GIB // len(chunk))]
    bomb = tmp_path / "padded.nii.gz"
    bomb.write_bytes(b"".join([*parts, deflate.flush()]))
    status, peak_kb, stderr = _segment(bomb, tmp_path)
    assert status == 1, stderr  # the image loads; the run then stops at the missing weights
    assert "weights" in stderr.lower()
    assert peak_kb < PEAK_LIMIT_KB, f"peak RSS {peak_kb / 1024:.0f} MiB"
