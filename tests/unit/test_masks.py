"""combine_masks: TotalSegmentator's totalseg_combine_masks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import InvalidImageError, InvalidOptionError, UnreadableImageError
from raytseg.masks import MASK_GROUPS, combine_masks
from raytseg.pipeline.export import nifti_gz_bytes
from raytseg.pipeline.labeltable import read_label_table
from raytseg.tasks import get_task

GROUPS_IN_TOTAL = [g for g in MASK_GROUPS if g != "body"]


def test_group_classes_exist_in_their_task() -> None:
    total = set(get_task("total").classes.values())
    for group in GROUPS_IN_TOTAL:
        assert set(MASK_GROUPS[group]) <= total, group
    assert set(MASK_GROUPS["body"]) <= set(get_task("body").classes.values())


@pytest.mark.parametrize("group", GROUPS_IN_TOTAL)
def test_folder_and_multilabel_agree(reference_data: Path, group: str) -> None:
    multilabel = reference_data / "example_seg_fast.nii.gz"
    from_folder = combine_masks(reference_data / "example_seg_fast", group)
    from_file = combine_masks(str(multilabel), group)
    assert from_folder.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(from_folder.dataobj), np.asarray(from_file.dataobj))
    labels = np.asarray(nib.load(multilabel).dataobj)
    ids = [k for k, name in get_task("total").classes.items() if name in MASK_GROUPS[group]]
    np.testing.assert_array_equal(np.asarray(from_file.dataobj), np.isin(labels, ids))
    assert len(from_folder.header.extensions) == 0


def test_multilabel_output_has_group_label_table(reference_data: Path) -> None:
    img = combine_masks(reference_data / "example_seg_fast", "lung", multilabel=True)
    assert read_label_table(img) == {1: "lung"}
    assert np.asarray(img.dataobj).any()


def test_unknown_group_lists_the_groups(reference_data: Path) -> None:
    with pytest.raises(InvalidOptionError, match="lung_left, lung_right"):
        combine_masks(reference_data / "example_seg_fast", "kidneys")


def test_missing_file_names_it_and_the_fix(tmp_path: Path, reference_data: Path) -> None:
    shutil.copy(reference_data / "example_seg_fast" / "hip_left.nii.gz", tmp_path)
    with pytest.raises(UnreadableImageError, match=r"femur_left\.nii\.gz.*without --ml"):
        combine_masks(tmp_path, "pelvis")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError, match="does not exist"):
        combine_masks(tmp_path / "nope", "lung")


def test_multilabel_file_without_class_or_table(tmp_path: Path, reference_data: Path) -> None:
    shutil.copy(reference_data / "example_seg_roi_subset.nii.gz", tmp_path / "liver_only.nii.gz")
    with pytest.raises(InvalidImageError, match="lung_upper_lobe_left.*--roi_subset"):
        combine_masks(tmp_path / "liver_only.nii.gz", "lung")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), tmp_path / "plain.nii.gz")
    with pytest.raises(InvalidImageError, match="no label table"):
        combine_masks(tmp_path / "plain.nii.gz", "lung")


def test_body_group(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    trunc = np.zeros((5, 6, 7), np.uint8)
    trunc[1:3, 1:4, 2:6] = 1
    extremities = np.zeros_like(trunc)
    extremities[4, 5, 0] = 1
    nib.save(nib.Nifti1Image(trunc, affine), tmp_path / "body_trunc.nii.gz")
    nib.save(nib.Nifti1Image(extremities, affine), tmp_path / "body_extremities.nii.gz")
    img = combine_masks(tmp_path, "body")
    np.testing.assert_array_equal(np.asarray(img.dataobj), trunc | extremities)
    np.testing.assert_array_equal(img.affine, affine)


@pytest.mark.reference
def test_equals_totalsegmentator(tmp_path: Path, ts_python: Path, reference_data: Path) -> None:
    # TotalSegmentator's "heart" branch is missing (it would iterate the letters of the
    # string); its list form ["heart"] is what the group means.
    cases = {g: ["heart"] if g == "heart" else g for g in GROUPS_IN_TOTAL}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    code = (
        "import json\n"
        "from pathlib import Path\n"
        "import nibabel as nib\n"
        "from totalsegmentator.libs import combine_masks\n"
        "from totalsegmentator.map_to_binary import class_map_5_parts\n"
        "from totalsegmentator.nifti_ext_header import add_label_map_to_nifti\n"
        f"ref = Path({str(reference_data)!r})\n"
        "for group, arg in json.load(open('cases.json')).items():\n"
        "    nib.save(combine_masks(ref / 'example_seg_fast', arg), f'{group}_dir.nii.gz')\n"
        "    img = combine_masks(ref / 'example_seg_fast.nii.gz', arg, multilabel=True)\n"
        "    if group == 'heart':\n"
        "        img.header.extensions.clear()\n"
        "        img = add_label_map_to_nifti(img, {1: group})\n"
        "    nib.save(img, f'{group}_ml.nii.gz')\n"
        "vertebrae = list(class_map_5_parts['class_map_part_vertebrae'].values())\n"
        "json.dump(vertebrae, open('vertebrae.json', 'w'))\n"
    )
    done = subprocess.run([str(ts_python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "vertebrae.json").read_text()) == MASK_GROUPS["vertebrae"]
    for group in GROUPS_IN_TOTAL:
        ours = nifti_gz_bytes(combine_masks(reference_data / "example_seg_fast", group))
        assert ours == (tmp_path / f"{group}_dir.nii.gz").read_bytes(), group
        ours_ml = nifti_gz_bytes(
            combine_masks(reference_data / "example_seg_fast.nii.gz", group, multilabel=True)
        )
        assert ours_ml == (tmp_path / f"{group}_ml.nii.gz").read_bytes(), group
