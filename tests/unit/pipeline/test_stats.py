"""Statistics: the numbers TotalSegmentator's get_basic_statistics writes, exactly."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import InvalidImageError
from raytseg.pipeline.labeltable import add_label_table
from raytseg.pipeline.stats import (
    basic_statistics,
    label_counts_and_sums,
    read_segmentation_labels,
    statistics_json,
)
from raytseg.tasks import get_task


def _ts_port(
    seg: np.ndarray, ct_data: np.ndarray, zooms: Any, classes: dict[int, str], *, exclude: bool, metric: str
) -> dict[str, dict[str, Any]]:
    """TotalSegmentator statistics.get_basic_statistics, line by line (the slow oracle)."""
    ct = np.asarray(ct_data, dtype=np.float64).astype(np.int16)
    vox_vol = zooms[0] * zooms[1] * zooms[2]
    stats: dict[str, dict[str, Any]] = {}
    for k, name in classes.items():
        stats[name] = {}
        data = seg == k
        touches = any(
            np.any(data[tuple(slice(None) if a != axis else sl for a in range(3))])
            for axis in range(3)
            for sl in (slice(None, 3), slice(-3, None))
        )
        if touches and exclude:
            stats[name]["volume"] = 0.0
            stats[name]["intensity"] = 0.0
            continue
        stats[name]["volume"] = data.sum() * vox_vol
        roi = (data > 0).astype(np.uint8)
        if metric == "mean":
            stats[name]["intensity"] = np.average(ct, weights=roi).round(5) if roi.sum() > 0 else 0.0
        else:
            stats[name]["intensity"] = np.median(ct[roi > 0]).round(5) if roi.sum() > 0 else 0.0
    return stats


def _random_case(dtype: Any, shape: tuple[int, int, int] = (40, 33, 27)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(1, 9):
        lo = rng.integers(0, np.array(shape) - 6)
        labels[lo[0] : lo[0] + 6, lo[1] : lo[1] + 5, lo[2] : lo[2] + 4] = k
    labels[0, 5, 5] = 9  # touches the border
    if np.issubdtype(dtype, np.floating):
        image = rng.normal(0, 400, shape).astype(dtype)
    else:
        image = rng.integers(-1024, 2000, shape).astype(dtype)
    return labels, image


CLASSES = {k: f"c{k}" for k in range(1, 11)}  # c10 never occurs
ZOOMS = (np.float32(0.977), np.float32(0.977), np.float32(1.25))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("metric", ["mean", "median"])
@pytest.mark.parametrize("exclude", [True, False])
def test_equals_totalsegmentator_port(dtype: Any, metric: str, exclude: bool) -> None:
    labels, image = _random_case(dtype)
    got = basic_statistics(
        labels, image, tuple(map(float, ZOOMS)), CLASSES, include_incomplete=not exclude, aggregation=metric
    )
    expected = _ts_port(labels, image, ZOOMS, CLASSES, exclude=exclude, metric=metric)
    assert got == expected
    assert list(got) == list(expected)
    assert statistics_json(got) == json.dumps(expected, indent=4).encode()


def test_reproduces_reference_statistics_json(reference_data: Path) -> None:
    ct = nib.load(reference_data / "example_ct_sm.nii.gz")
    labels = np.asarray(nib.load(reference_data / "example_seg_fast.nii.gz").dataobj)
    zooms = tuple(float(z) for z in ct.header.get_zooms())
    stats = basic_statistics(
        labels, np.asarray(ct.dataobj), zooms, get_task("total").classes, include_incomplete=True
    )
    expected_text = (reference_data / "example_seg_fast" / "statistics.json").read_bytes()
    expected = json.loads(expected_text)
    assert list(stats) == list(expected)
    assert stats == expected
    assert statistics_json(stats) == expected_text


def test_extra_metrics() -> None:
    labels, image = _random_case(np.int16)
    stats = basic_statistics(labels, image, (1.0, 1.0, 1.0), CLASSES, extra=True)
    c1 = stats["c1"]
    mask = labels == 1
    idx = np.argwhere(mask)
    assert list(c1) == [
        "volume",
        "intensity",
        "n_voxels",
        "intensity_std",
        "intensity_min",
        "intensity_max",
        "centroid_vox",
        "bbox_vox",
    ]
    assert c1["n_voxels"] == int(mask.sum())
    assert c1["intensity_std"] == float(np.std(image[mask]).round(5))
    assert c1["centroid_vox"] == [round(float(c), 2) for c in idx.mean(axis=0)]
    assert c1["bbox_vox"] == [[int(idx[:, a].min()), int(idx[:, a].max())] for a in range(3)]
    assert stats["c9"]["centroid_vox"] is None  # border class, excluded
    assert stats["c10"]["n_voxels"] == 0  # absent class


def test_label_counts_and_sums_match_bincount() -> None:
    labels, image = _random_case(np.int16)
    counts, sums = label_counts_and_sums(labels, image, 5)  # labels >= 5 are dropped
    np.testing.assert_array_equal(counts, np.bincount(labels.ravel(), minlength=5)[:5])
    full = np.bincount(labels.ravel(), weights=image.ravel().astype(np.float64))[:5]
    np.testing.assert_array_equal(sums, full.astype(np.int64))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        basic_statistics(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3)), (1.0, 1.0, 1.0), CLASSES)


def test_read_segmentation_labels_multilabel_and_folder(tmp_path: Path) -> None:
    labels, _ = _random_case(np.int16)
    img = nib.Nifti1Image(labels, np.eye(4))
    nib.save(add_label_table(img, {1: "spleen", 2: "liver"}), tmp_path / "seg.nii.gz")
    got, classes = read_segmentation_labels(str(tmp_path / "seg.nii.gz"), "total", labels.shape)
    np.testing.assert_array_equal(got, labels)
    assert classes == {1: "spleen", 2: "liver"}

    nib.save(img, tmp_path / "plain.nii.gz")
    _, classes = read_segmentation_labels(str(tmp_path / "plain.nii.gz"), "total", labels.shape)
    assert classes == get_task("total").classes

    folder = tmp_path / "masks"
    folder.mkdir()
    nib.save(nib.Nifti1Image((labels == 3).astype(np.uint8), np.eye(4)), folder / "liver.nii.gz")
    got, classes = read_segmentation_labels(str(folder), "total", labels.shape)
    np.testing.assert_array_equal(got, np.where(labels == 3, 5, 0))  # liver is 5 in total
    with pytest.raises(InvalidImageError, match="shape"):
        read_segmentation_labels(str(folder), "total", (1, 2, 3))


@pytest.mark.reference
def test_equals_totalsegmentator(tmp_path: Path, ts_python: Path) -> None:
    labels, image = _random_case(np.int32, shape=(60, 50, 40))
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "ct.nii.gz")
    np.save(tmp_path / "seg.npy", labels)
    _run = (
        "import pickle, numpy as np\n"
        "from totalsegmentator.statistics import get_basic_statistics\n"
        "seg = np.load('seg.npy').astype(np.float64)\n"
        "out = {}\n"
        "for metric in ('mean', 'median'):\n"
        "    for exclude in (True, False):\n"
        "        out[metric, exclude] = get_basic_statistics(\n"
        "            seg, 'ct.nii.gz', None, True, 'total', exclude, metric=metric, extra_metrics=True)\n"
        "pickle.dump(out, open('out.pkl', 'wb'))\n"
    )
    done = subprocess.run([str(ts_python), "-c", _run], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = pickle.loads((tmp_path / "out.pkl").read_bytes())
    ct = nib.load(tmp_path / "ct.nii.gz")
    zooms = tuple(float(z) for z in ct.header.get_zooms())
    for (metric, exclude), ts_stats in expected.items():
        got = basic_statistics(
            labels,
            np.asarray(ct.dataobj),
            zooms,
            get_task("total").classes,
            include_incomplete=not exclude,
            aggregation=metric,
            extra=True,
        )
        assert got == ts_stats, (metric, exclude)
        assert json.dumps(got, indent=4) == json.dumps(ts_stats, indent=4)
