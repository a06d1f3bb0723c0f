"""What follows a pass (``after_pass``): the next pass's region, or the request's answer."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from raytseg.pipeline.passes import Region, after_pass
from raytseg.pipeline.plan import Pass, passes, plan_run
from raytseg.pipeline.records import Segmentation, SegmentOptions, Volume

SHAPE = (40, 30, 20)


AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def _volume() -> Volume:
    image = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.int16), AFFINE)
    return Volume(np.asarray(image.dataobj), AFFINE, image.header)


CROP_BACKENDS = {"298/nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres": "openvino"}


def _found(step: Pass, labels: np.ndarray) -> Segmentation:
    """A crop pass's output with these labels."""
    header = nib.Nifti1Image(labels, AFFINE).header
    classes = dict(step.plan.output_classes)
    return Segmentation(labels, AFFINE, header, classes, step.plan.main.task, backends=CROP_BACKENDS)


def _roi_request() -> tuple[Pass, ...]:
    options = SegmentOptions(fast=True, roi_subset=("liver",), statistics=True)
    return passes(plan_run(options), options)


def test_the_main_pass_answers_with_its_own_segmentation() -> None:
    options = SegmentOptions(fast=True)
    steps = passes(plan_run(options), options)
    seg = _found(steps[0], np.ones(SHAPE, dtype=np.uint8))
    assert after_pass(_volume(), steps, 0, seg) is seg


def test_a_crop_pass_gives_the_box_of_its_rois_plus_the_margin() -> None:
    steps = _roi_request()
    crop = steps[0]
    liver = {name: idx for idx, name in crop.plan.output_classes.items()}["liver"]
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[10:20, 5:15, 8:12] = liver
    labels[0:2, 0:2, 0:2] = liver + 1  # another class: not part of the region
    following = after_pass(_volume(), steps, 0, _found(crop, labels))
    assert isinstance(following, Region)
    assert following.found_by == CROP_BACKENDS  # the main pass's segmentation reports them too
    margin = round(20 / 1.5)  # the default crop margin, 20 mm, in 1.5 mm voxels
    assert following.box == (
        (max(10 - margin, 0), min(20 + margin, SHAPE[0])),
        (max(5 - margin, 0), min(15 + margin, SHAPE[1])),
        (max(8 - margin, 0), min(12 + margin, SHAPE[2])),
    )


def test_an_empty_crop_region_answers_zeros_for_the_main_pass() -> None:
    steps = _roi_request()
    volume = _volume()
    following = after_pass(volume, steps, 0, _found(steps[0], np.zeros(SHAPE, dtype=np.uint8)))
    assert isinstance(following, Segmentation)
    assert following.labels.shape == SHAPE
    assert not following.labels.any()
    main = steps[-1]
    assert following.task == main.plan.main.task
    assert following.label_map == dict(main.plan.output_classes)  # the roi_subset classes
    assert following.backends == CROP_BACKENDS  # the only networks that ran
    assert following.statistics is not None  # the request asked for statistics
    assert set(following.statistics) == {"liver"}


def test_statistics_extra_reaches_the_statistics_except_fast_ones() -> None:
    from raytseg.pipeline.passes import empty_segmentation

    for extra, fast in [(False, False), (True, False), (True, True)]:
        options = SegmentOptions(fast=fast, roi_subset=("liver",), statistics=True, statistics_extra=extra)
        main = passes(plan_run(options), options)[-1]
        stats = empty_segmentation(_volume(), main).statistics
        assert stats is not None
        # TotalSegmentator ignores -sx for --fast statistics (computed on the model grid).
        assert ("n_voxels" in stats["liver"]) is (extra and not fast)
