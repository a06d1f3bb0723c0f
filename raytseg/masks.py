"""Combine class masks into one, as TotalSegmentator's ``totalseg_combine_masks`` does.

    raytseg combine-masks -i segmentations -o lung.nii.gz -m lung

The source is a folder of per-class files (``raytseg segment`` without ``--ml``) or a
multilabel file with its label table (``--ml``). The result equals TotalSegmentator's
``libs.combine_masks``: uint8 0/1 voxels, a fresh header, the affine of the first mask.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from raytseg.errors import InvalidImageError, InvalidOptionError, UnreadableImageError
from raytseg.pipeline.labeltable import add_label_table
from raytseg.pipeline.readback import read_class_folder, read_multilabel

_RIBS = [f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]
# TotalSegmentator map_to_binary.class_map_5_parts["class_map_part_vertebrae"], in its order
_VERTEBRAE = ["sacrum", "vertebrae_S1"]
_VERTEBRAE += [f"vertebrae_L{i}" for i in range(5, 0, -1)]
_VERTEBRAE += [f"vertebrae_T{i}" for i in range(12, 0, -1)]
_VERTEBRAE += [f"vertebrae_C{i}" for i in range(7, 0, -1)]

#: The groups ``combine_masks`` accepts, and the classes each one unites.
MASK_GROUPS: dict[str, list[str]] = {
    "lung": [
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    ],
    "lung_left": ["lung_upper_lobe_left", "lung_lower_lobe_left"],
    "lung_right": ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "vertebrae": _VERTEBRAE,
    "ribs": _RIBS,
    "vertebrae_ribs": _VERTEBRAE + _RIBS,
    # TotalSegmentator lists "heart" as a choice but has no branch for it (it iterates
    # the letters of the string and fails); the evident intent is the heart class.
    "heart": ["heart"],
    "pelvis": ["femur_left", "femur_right", "hip_left", "hip_right"],
    "body": ["body_trunc", "body_extremities"],
}


def _how_to_fix(classes: list[str]) -> str:
    task = "body" if classes == MASK_GROUPS["body"] else "total"
    return (
        f"Run `raytseg segment -ta {task}` for the whole task, without --ml and without "
        "--roi_subset, and combine that output folder."
    )


def combine_masks(source: str | Path, mask_group: str, *, multilabel: bool = False) -> nib.Nifti1Image:
    """One binary mask uniting the classes of ``mask_group``.

    Args:
        source: A folder of ``<class>.nii.gz`` files, or a multilabel NIfTI file with
            TotalSegmentator's label table.
        mask_group: One of ``MASK_GROUPS``: lung, lung_left, lung_right, vertebrae, ribs,
            vertebrae_ribs, heart, pelvis, body.
        multilabel: Add the label table ``{1: mask_group}`` to the result's header.

    Returns:
        A uint8 image (1 inside any of the classes) with a fresh header.

    Raises:
        InvalidOptionError: ``mask_group`` is not a known group.
        UnreadableImageError: ``source`` or a class file is missing or not NIfTI.
        InvalidImageError: the multilabel file lacks a class or its label table.

    Example:
        >>> img = combine_masks("segmentations", "lung")  # doctest: +SKIP
        >>> nib.save(img, "lung.nii.gz")  # doctest: +SKIP
    """
    if mask_group not in MASK_GROUPS:
        raise InvalidOptionError(
            f"Unknown mask group {mask_group!r}. Valid groups: {', '.join(MASK_GROUPS)}."
        )
    classes = MASK_GROUPS[mask_group]
    combined = _combined(Path(source), classes)
    return add_label_table(combined, {1: mask_group}) if multilabel else combined


def _combined(path: Path, classes: list[str]) -> nib.Nifti1Image:
    if path.is_dir():
        found = read_class_folder(
            path, dict(enumerate(classes, 1)), all_required=True, hint=_how_to_fix(classes)
        )
        return nib.Nifti1Image((found.labels > 0).astype(np.uint8), found.affine)
    if not path.is_file():
        raise UnreadableImageError(
            f"{path} does not exist. Pass the output folder (or --ml file) of `raytseg segment`."
        )
    found = read_multilabel(str(path), fallback=None)
    ids = {name: k for k, name in found.classes.items()}
    missing = [name for name in classes if name not in ids]
    if missing:
        raise InvalidImageError(
            f"{path} has no class {', '.join(missing)} in its label table. {_how_to_fix(classes)}"
        )
    combined = np.isin(found.labels, [ids[name] for name in classes]).astype(np.uint8)
    return nib.Nifti1Image(combined, found.affine)
