"""The 3D preview rendered off-screen: layout, colours, the patient's sides, determinism.

What the picture looks like on the reference CT is in the README (docs/preview_total.png).
"""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest

from raytseg.pipeline import preview3d
from raytseg.pipeline.export import output_files
from raytseg.pipeline.records import OutputOptions, Segmentation, Volume
from raytseg.tasks import get_task

pytest.importorskip("vtkmodules")
SHAPE = (40, 30, 50)  # RAS voxels of 2 mm


def _case(affine: np.ndarray | None = None) -> tuple[Segmentation, Volume]:
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    ids = {name: idx for idx, name in get_task("total").classes.items()}
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[26:36, 10:20, 15:30] = ids["kidney_right"]  # +x: the patient's right
    labels[4:14, 10:20, 15:30] = ids["kidney_left"]
    data = np.full(SHAPE, 40, dtype=np.int16)
    header = nib.Nifti1Image(labels, affine).header
    seg = Segmentation(labels, affine, header, dict(get_task("total").classes), "total")
    return seg, Volume(data, affine, nib.Nifti1Image(data, affine).header)


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)


def test_columns_colours_and_the_patients_right_on_the_left() -> None:
    seg, volume = _case()
    png = preview3d.preview3d_png(seg, volume)
    rgb = _pixels(png)
    columns = len(get_task("total").preview_groups or ()) + 1
    column_px = round(SHAPE[0] * 2.0 * preview3d.PIXELS_PER_MM)
    assert rgb.shape == (round(SHAPE[2] * 2.0 * preview3d.PIXELS_PER_MM), column_px * columns, 3)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # kidney_right and kidney_left are the 2nd and 3rd class of their group: palette rows 1, 2.
    right = (r > 2 * g) & (r > 40)
    left = (g > 0.8 * r) & (b < 0.6 * g) & (r > 40)
    assert right.sum() > 50
    assert left.sum() > 50
    # Seen from the front, as TotalSegmentator shows it: the patient's right on the left.
    assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()
    assert preview3d.preview3d_png(seg, volume) == png  # deterministic


def test_the_picture_does_not_depend_on_the_storage_order() -> None:
    seg, volume = _case()
    flipped = np.diag([-2.0, 2.0, 2.0, 1.0])
    flipped[0, 3] = 2.0 * (SHAPE[0] - 1)  # the same RAS positions, x stored the other way
    other_seg, other_volume = _case(flipped)
    labels, data = seg.labels[::-1].copy(), volume.data[::-1].copy()
    other_seg = Segmentation(labels, flipped, other_seg.header, seg.label_map, "total")
    other_volume = Volume(data, flipped, other_volume.header)
    assert preview3d.preview3d_png(other_seg, other_volume) == preview3d.preview3d_png(seg, volume)


def test_the_2d_overview_stays_available() -> None:
    seg, volume = _case()
    three_d = dict(output_files(seg, volume, OutputOptions(ml=True, preview=True)))["preview_total.png"]
    two_d = dict(output_files(seg, volume, OutputOptions(ml=True, preview=True, preview_kind="2d")))
    assert three_d == preview3d.preview3d_png(seg, volume)
    assert two_d["preview_total.png"] != three_d
    assert _pixels(two_d["preview_total.png"]).shape[1] < _pixels(three_d).shape[1]


def test_a_task_without_groups_gets_one_column_of_every_class() -> None:
    seg, volume = _case()
    seg = Segmentation(seg.labels, seg.affine, seg.header, seg.label_map, "not_a_catalogue_task")
    width = _pixels(preview3d.preview3d_png(seg, volume)).shape[1]
    assert width == 2 * round(SHAPE[0] * 2.0 * preview3d.PIXELS_PER_MM)  # the slice and one group
