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
    path = Path(source)
    if path.is_file():
        combined = _from_multilabel(path, classes)
    elif path.is_dir():
        combined = _from_folder(path, classes)
    else:
        raise UnreadableImageError(
            f"{path} does not exist. Pass the output folder (or --ml file) of `raytseg segment`."
        )
    if multilabel:
        from raytseg.pipeline.export import add_label_table

        combined = add_label_table(combined, {1: mask_group})
    return combined


def _from_folder(folder: Path, classes: list[str]) -> nib.Nifti1Image:
    files = [folder / f"{name}.nii.gz" for name in classes]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UnreadableImageError(f"Could not find {', '.join(missing)} in {folder}. {_how_to_fix(classes)}")
    ref = _load(files[0])
    combined = np.zeros(ref.shape, dtype=np.uint8)
    for file in files:
        img = ref if file == files[0] else _load(file)
        if img.shape != ref.shape:
            raise InvalidImageError(
                f"{file.name} has shape {img.shape} but {files[0].name} has {ref.shape}: "
                f"the files in {folder} are not from one segmentation. {_how_to_fix(classes)}"
            )
        combined[img.get_fdata() > 0.5] = 1
    return nib.Nifti1Image(combined, ref.affine)


def _from_multilabel(file: Path, classes: list[str]) -> nib.Nifti1Image:
    from raytseg.pipeline.export import read_label_table

    img = _load(file)
    ids = {name: k for k, name in read_label_table(img).items()}
    missing = [name for name in classes if name not in ids]
    if missing:
        raise InvalidImageError(
            f"{file} has no class {', '.join(missing)} in its label table. {_how_to_fix(classes)}"
        )
    data = np.asanyarray(img.dataobj)
    combined = np.isin(data, [ids[name] for name in classes]).astype(np.uint8)
    return nib.Nifti1Image(combined, img.affine)


def _load(file: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(file)
    except Exception as exc:  # nibabel raises many types for bad files
        raise UnreadableImageError(f"Could not read {file} as NIfTI: {exc}") from exc
    if not isinstance(img, nib.Nifti1Image):
        raise UnreadableImageError(f"{file} is not a NIfTI-1 image.")
    return img
