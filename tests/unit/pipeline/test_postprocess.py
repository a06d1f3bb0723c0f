"""Postprocessing rules ported from TotalSegmentator, on small synthetic label maps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from raytseg.pipeline.plan import ModelRun, plan_run
from raytseg.pipeline.postprocess import (
    FinalOps,
    final_labels,
    keep_largest_blob,
    remove_small_blobs,
    renumber,
    stitch_chunks,
    upsample_one_hot,
)
from raytseg.pipeline.records import ChunkSplit, Segmentation, SegmentOptions
from raytseg.pipeline.zoom import resample
from raytseg.tasks import get_task


def test_remove_small_blobs_removes_components_up_to_the_threshold() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[0, 0, 0] = 1  # 1 voxel: removed
    labels[5:8, 5:8, 5:8] = 1  # 27 voxels: kept
    labels[0:2, 9, 9] = 2  # other label untouched
    remove_small_blobs(labels, [1], 5)
    assert (labels == 1).sum() == 27
    assert labels[0, 0, 0] == 0
    assert (labels == 2).sum() == 2


def test_remove_small_blobs_threshold_is_inclusive() -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[0:5, 0, 0] = 3  # exactly 5 voxels
    remove_small_blobs(labels, [3], 5)
    assert labels.sum() == 0


def test_keep_largest_blob_keeps_first_of_equal_sizes() -> None:
    labels = np.zeros((9, 9, 9), dtype=np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels, found first
    labels[5:7, 5:7, 5:7] = 1  # 8 voxels
    labels[8, 8, 8] = 2
    keep_largest_blob(labels, 1)
    assert labels[0, 0, 0] == 1
    assert labels[5, 5, 5] == 0
    assert labels[8, 8, 8] == 2


def test_stitch_chunks_inverts_totalsegmentator_split() -> None:
    depth = 130
    volume = np.random.default_rng(0).integers(0, 5, size=(4, 3, depth), dtype=np.uint8)
    split = ChunkSplit(third=depth // 3)
    t, m = split.third, split.margin
    chunks = [volume[:, :, : t + m], volume[:, :, t + 1 - m : 2 * t + m], volume[:, :, 2 * t + 1 - m :]]
    np.testing.assert_array_equal(stitch_chunks(chunks, split), volume)


def test_final_labels_filters_rois_and_binarises() -> None:
    data = np.arange(27, dtype=np.uint8).reshape(3, 3, 3) % 4
    img = nib.Nifti1Image(data, np.eye(4))
    run = ModelRun("total", (), None, 0.8, {1: "a", 2: "b", 3: "c"})
    out = final_labels(img, run, FinalOps(roi_ids=(2,)), (1.0, 1.0, 1.0))
    assert set(np.unique(out)) == {0, 2}
    binary = ModelRun("body", (), None, 0.5, {1: "a"}, binarize=True)
    assert set(np.unique(final_labels(img, binary, FinalOps(), (1.0, 1.0, 1.0)))) == {0, 1}


@pytest.mark.parametrize("device", [None, "cpu"])
def test_labels_resample_on_their_own_dtype_as_totalsegmentator_on_float64(device: str | None) -> None:
    """The postprocess stage resamples uint8 labels where TotalSegmentator uses float64."""
    import torch

    labels = np.random.default_rng(1).integers(0, 118, size=(23, 17, 11)).astype(np.uint8)
    zoom = np.array([47, 35, 29]) / np.array(labels.shape)
    reference = ndimage.zoom(labels.astype(np.float64), zoom, order=0, mode="nearest")
    ours = resample(labels, zoom.tolist(), 0, None if device is None else torch.device(device))
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_images_resample_in_float64_then_truncate_to_int32(device: str | None, order: int) -> None:
    """TotalSegmentator's change_spacing(order=order, dtype=np.int32) of an int16 CT."""
    import torch

    image = np.random.default_rng(2).integers(-1024, 3000, size=(19, 13, 9)).astype(np.int16)
    zoom = [1.7, 0.6, 2.3]
    reference = ndimage.zoom(image.astype(np.float64), zoom, order=order, mode="nearest").astype(np.int32)
    ours = resample(image, zoom, order, None if device is None else torch.device(device), dtype=np.int32)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, reference)


def test_v1_order_renumbers_as_totalsegmentator_1_and_drops_what_it_lacked() -> None:
    task = get_task("total")
    assert task.v1_classes is not None
    plan = plan_run(SegmentOptions(task="total", v1_order=True))
    assert plan.renumbering is not None
    assert plan.renumbering.classes == task.v1_classes
    ids = {name: idx for idx, name in task.classes.items()}
    v1_ids = {name: idx for idx, name in task.v1_classes.items()}
    labels = np.array([ids["spleen"], ids["heart"], ids["urinary_bladder"], ids["skull"], 0], dtype=np.uint8)
    seg = Segmentation(labels, np.eye(4), nib.Nifti1Header(), dict(task.classes), "total")
    renumbered = renumber(seg, plan.renumbering)
    # heart and skull are TotalSegmentator 2 classes: v1 had heart chambers and no skull.
    assert renumbered.labels.tolist() == [v1_ids["spleen"], 0, v1_ids["urinary_bladder"], 0, 0]
    assert v1_ids["urinary_bladder"] != ids["urinary_bladder"]
    assert renumbered.label_map == task.v1_classes
    assert renumber(seg, None) is seg


def test_v1_order_keeps_the_roi_subset_and_is_ignored_by_other_tasks() -> None:
    plan = plan_run(SegmentOptions(task="total", v1_order=True, roi_subset=("liver", "skull")))
    assert plan.renumbering is not None
    assert list(plan.renumbering.classes.values()) == ["liver"]  # skull is no v1 class
    assert plan_run(SegmentOptions(task="body", v1_order=True)).renumbering is None
    assert plan_run(SegmentOptions(task="total")).renumbering is None


@pytest.mark.reference
def test_one_hot_upsampling_equals_totalsegmentator(tmp_path: Path, ts_python: Path) -> None:
    """``upsample_one_hot`` against TotalSegmentator's ``resample_one_hot_crop`` (order 1), the
    resampling of ``--higher_order_resampling_LEGACY``: overlapping boxes, a one-voxel class,
    classes on the border, an absent label, upsampling by uneven factors on each axis."""
    rng = np.random.default_rng(7)
    labels = np.zeros((31, 24, 19), dtype=np.uint8)
    labels[3:20, 4:15, 2:12] = 2
    labels[10:28, 8:24, 5:19] = 5  # overlaps 2's box, touches two borders
    labels[0:4, 0:3, 0:2] = 9
    labels[15, 12, 9] = 11  # one voxel
    labels[rng.random(labels.shape) < 0.03] = 3  # speckle
    shape = (70, 61, 47)
    np.save(tmp_path / "seg.npy", labels)
    script = (
        "import numpy as np\n"
        "from totalsegmentator.resampling import resample_one_hot_crop\n"
        "seg = np.load('seg.npy').astype(np.float64)\n"  # its get_fdata copy
        f"np.save('out.npy', resample_one_hot_crop(seg, {shape}, order=1).astype(np.uint8))\n"
    )
    done = subprocess.run([str(ts_python), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = np.load(tmp_path / "out.npy")
    ours = upsample_one_hot(labels, shape)
    assert set(np.unique(theirs)) == {0, 2, 3, 5, 9, 11}  # every class survives the upsampling
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.reference
def test_refinement_equals_totalsegmentators_vertebrae_refinement(tmp_path: Path, ts_python: Path) -> None:
    """``final_labels`` with a refining pass's mask against TotalSegmentator's
    ``refine_vertebrae_pp_with_body_mask`` (vertebrae_pp_refined): labels dilated by 2 mm into
    the background on an anisotropic grid, then clipped to the body mask."""
    rng = np.random.default_rng(11)
    labels = np.zeros((40, 36, 22), dtype=np.uint8)
    labels[5:15, 6:20, 3:9], labels[16:30, 10:25, 8:15], labels[30:38, 2:8, 15:21] = 20, 21, 24
    body = (rng.random(labels.shape) < 0.7).astype(np.uint8)
    body[rng.random(labels.shape) < 0.1] = 2  # the discs, also outside what is kept
    zooms = (0.8, 0.8, 1.5)
    np.save(tmp_path / "seg.npy", labels)
    np.save(tmp_path / "body.npy", body)
    script = (
        "import numpy as np\n"
        "from totalsegmentator.map_to_binary import class_map\n"
        "from totalsegmentator.postprocessing import refine_vertebrae_pp_with_body_mask\n"
        "out = refine_vertebrae_pp_with_body_mask(np.load('seg.npy'), np.load('body.npy'),\n"
        f"    class_map['vertebrae_pp_refined'], voxel_spacing={zooms}, dilation_mm=2)\n"
        "np.save('out.npy', out)\n"
    )
    done = subprocess.run([str(ts_python), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = plan_run(SegmentOptions(task="vertebrae_pp_refined")).main
    ops = FinalOps(refine_inside=body == 1, refine_dilation_mm=2.0)
    ours = final_labels(nib.Nifti1Image(labels, np.eye(4)), run, ops, zooms)
    theirs = np.load(tmp_path / "out.npy")
    assert (theirs > labels).any()  # the dilation added voxels ...
    assert not theirs[body != 1].any()  # ... and the clip removed them outside the bodies
    np.testing.assert_array_equal(ours, theirs)
