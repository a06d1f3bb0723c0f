"""Segmentations read back from files: a multilabel NIfTI or a folder of per-class masks.

``raytseg stats`` and ``raytseg combine-masks`` take what ``raytseg segment`` (or
TotalSegmentator) wrote; both read it here.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from raytseg import storage
from raytseg.errors import InvalidImageError, UnreadableImageError
from raytseg.pipeline.labeltable import read_label_table


@dataclass(frozen=True)
class SegmentationFile:
    """Labels read back, with the names of their ids."""

    labels: np.ndarray  # uint8
    classes: dict[int, str]
    affine: np.ndarray


def read_segmentation(source: str, classes: Mapping[int, str], hint: str) -> SegmentationFile:
    """A multilabel file (its label table names the ids, else ``classes`` do) or a local
    folder of ``<class>.nii.gz`` masks of ``classes`` (missing ones are empty, as in
    TotalSegmentator's ``combine_masks_to_multilabel_file``); ``hint`` ends error messages."""
    folder = None if storage.is_uri(source) else storage.local_path(source)
    if folder is not None and folder.is_dir():
        return read_class_folder(folder, classes, all_required=False, hint=hint)
    return read_multilabel(source, fallback=classes)


def read_multilabel(source: str, *, fallback: Mapping[int, str] | None) -> SegmentationFile:
    """A multilabel NIfTI; without a label table its ids are ``fallback``'s (None: an error)."""
    img = read_nifti(source)
    try:
        classes = read_label_table(img)
    except InvalidImageError:
        if fallback is None:
            raise
        classes = dict(fallback)
    data = np.asarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.where(data == np.round(data), data, 0)  # a fractional value equals no class id
    return SegmentationFile(data.astype(np.uint8, copy=False), classes, img.affine)


def read_class_folder(
    folder: Path, classes: Mapping[int, str], *, all_required: bool, hint: str
) -> SegmentationFile:
    """The masks ``<class>.nii.gz`` in ``folder`` as one label image (ids from ``classes``)."""
    present = {k: folder / f"{name}.nii.gz" for k, name in classes.items()}
    missing = [file.name for file in present.values() if not file.exists()]
    if (all_required and missing) or len(missing) == len(present):
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UnreadableImageError(f"Could not find {shown} in {folder}. {hint}")
    labels, affine, first = np.zeros(0, np.uint8), np.eye(4), ""
    for k, file in present.items():
        if not file.exists():
            continue
        img = read_nifti(str(file))
        if not first:
            labels, affine, first = np.zeros(img.shape, np.uint8), img.affine, file.name
        elif img.shape != labels.shape:
            raise InvalidImageError(
                f"{file.name} has shape {img.shape} but {first} has {labels.shape}: "
                f"the files in {folder} are not from one segmentation. {hint}"
            )
        labels[np.asarray(img.dataobj) > 0.5] = k
    return SegmentationFile(labels, dict(classes), affine)


def read_nifti(source: str) -> nib.Nifti1Image:
    """A NIfTI-1 file (``.nii`` or ``.nii.gz``) from a path or URI."""
    raw = storage.read_bytes(source)
    try:
        return nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except Exception as exc:  # nibabel raises many types for bad files
        raise UnreadableImageError(f"Could not read {source} as NIfTI: {exc}") from exc
