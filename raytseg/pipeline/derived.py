"""Masks TotalSegmentator derives from a segmentation: task ``body``'s body.nii.gz and skin.nii.gz."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from raytseg.errors import InvalidOptionError
from raytseg.pipeline.postprocess import remove_small_blobs
from raytseg.pipeline.records import Segmentation, Volume


def derived_body_masks(seg: Segmentation, image: Volume) -> dict[str, nib.Nifti1Image]:
    """body.nii.gz and skin.nii.gz, which TotalSegmentator adds to task ``body`` outputs.

    body is the union of body_trunc and body_extremities, saved as TotalSegmentator's
    ``combine_masks`` saves it (fresh header, the affine as read back from a class file);
    skin is TotalSegmentator's ``extract_skin`` on the input image.

    Raises:
        InvalidOptionError: ``seg`` lacks body_trunc or body_extremities (e.g. roi_subset).
    """
    ids = {name: k for k, name in seg.label_map.items()}
    missing = [n for n in ("body_trunc", "body_extremities") if n not in ids]
    if missing:
        raise InvalidOptionError(
            f"body.nii.gz and skin.nii.gz need the classes {', '.join(missing)}: "
            "segment the whole body task (no roi_subset), or skip the derived masks."
        )
    body = np.isin(seg.labels, [ids["body_trunc"], ids["body_extremities"]]).astype(np.uint8)
    skin = extract_skin(image.data, body)
    return {
        "body.nii.gz": nib.Nifti1Image(body, _affine_as_saved(seg)),
        "skin.nii.gz": nib.Nifti1Image(skin.astype(np.uint8), image.affine),
    }


def _affine_as_saved(seg: Segmentation) -> np.ndarray:
    """The affine nibabel reads back from a saved class mask (float32 header fields)."""
    header = seg.header.copy()
    header.set_data_dtype(np.uint8)
    shaped_like_labels = np.broadcast_to(np.zeros(1, dtype=np.uint8), seg.labels.shape)  # no memory
    img = nib.Nifti1Image(shaped_like_labels, seg.affine, header)
    img.update_header()  # what nib.save does; the header fields are float32
    affine: np.ndarray = img.header.get_best_affine()
    return affine


def extract_skin(ct: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Skin voxels: the outer 3-4 voxel shell of ``body`` with CT density in (-200, 250).

    Ported from TotalSegmentator postprocessing.py ``extract_skin``; returns the mask
    that function wraps in a NIfTI image (int or bool 0/1 array).
    """
    from scipy.ndimage import binary_dilation, binary_erosion

    dilated = binary_dilation(body, iterations=1).astype(np.uint8)  # 1 voxel margin at the outside
    inner = binary_erosion(dilated, iterations=3).astype(np.uint8)
    skin = dilated - inner
    # TotalSegmentator compares get_fdata() floats; integer voxels compare the same
    density = (ct > -200) & (ct < 250)
    skin[~density] = 0
    mask: np.ndarray = (skin > 0).astype(np.uint8)
    remove_small_blobs(mask, [1], 5)  # TotalSegmentator: interval [5, 1e10]
    return mask
