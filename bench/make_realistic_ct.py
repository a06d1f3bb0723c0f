"""Make the benchmark CT: example_ct.nii.gz resampled to 0.78 x 0.78 x 1.5 mm.

TotalSegmentator's example CT is 122 x 101 x 112 voxels at 3 mm. Resampled (order 1) to a
typical clinical spacing it becomes 469 x 388 x 224 voxels, the size of an abdominal CT,
so benchmarks measure realistic work. Output: int16 NIfTI, same orientation and origin.

    .venv/bin/python bench/make_realistic_ct.py [OUT]   # default bench/out/realistic_ct.nii.gz
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "totalseg-reference" / "example_ct.nii.gz"
TARGET_MM = np.array([0.78, 0.78, 1.5])


def make(out: Path, source: Path = SOURCE) -> Path:
    if out.exists():
        return out
    src = nib.load(source)
    zoom = np.array(src.header.get_zooms()[:3]) / TARGET_MM
    data = ndimage.zoom(np.asanyarray(src.dataobj).astype(np.float32), zoom, order=1, mode="nearest")
    affine = src.affine.copy()
    for axis in range(3):
        affine[:3, axis] /= zoom[axis]
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), affine), out)
    return out


if __name__ == "__main__":
    path = make(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "bench" / "out" / "realistic_ct.nii.gz")
    img = nib.load(path)
    print(path, img.shape, tuple(round(float(z), 3) for z in img.header.get_zooms()))
