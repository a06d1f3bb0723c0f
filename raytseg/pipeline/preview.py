"""``-p --preview_kind 2d``: a PNG overview of a segmentation for a quick visual check.

The default preview is TotalSegmentator's 3D rendering (``preview3d``, VTK). This lighter
2D overview — coronal and sagittal projections of the image in a soft tissue window with
the frontmost label of each ray painted over it — needs no graphics library, for hosts
without VTK. Same file name: ``preview_<task>.png``.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from raytseg.pipeline.records import Segmentation, Volume

if TYPE_CHECKING:
    from PIL.Image import Image

WINDOW = (-115.0, 225.0)  # TotalSegmentator's preview window (soft tissue)
# TotalSegmentator's label colour cycle (nifti_ext_header.py).
COLOURS = np.array(
    [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
        [255, 128, 0], [255, 0, 128], [128, 255, 128], [0, 128, 255], [128, 128, 128], [185, 170, 155],
    ],
    dtype=np.float32,
)  # fmt: skip
ALPHA = 0.6


def preview_png(seg: Segmentation, image: Volume) -> bytes:
    """Coronal and sagittal overview side by side, 1 pixel per mm."""
    from PIL import Image as PILImage

    labels = nib.as_closest_canonical(nib.Nifti1Image(seg.labels, seg.affine))
    ct = nib.as_closest_canonical(nib.Nifti1Image(image.data, image.affine))
    zooms = labels.header.get_zooms()[:3]
    lab = np.asanyarray(labels.dataobj)
    img = np.asanyarray(ct.dataobj).astype(np.float32)
    views = [
        _panel(img, lab, axis=1, spacing=(zooms[0], zooms[2])),  # coronal: look from the front
        _panel(img, lab, axis=0, spacing=(zooms[1], zooms[2])),  # sagittal: look from the side
    ]
    height = max(v.height for v in views)
    canvas = PILImage.new("RGB", (sum(v.width for v in views), height))
    x = 0
    for view in views:
        canvas.paste(view, (x, (height - view.height) // 2))
        x += view.width
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def _panel(img: np.ndarray, labels: np.ndarray, *, axis: int, spacing: tuple[float, float]) -> Image:
    from PIL import Image as PILImage

    lo, hi = WINDOW
    grey = np.clip((img.mean(axis=axis) - lo) / (hi - lo), 0, 1) * 255
    front = _frontmost(labels, axis)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    painted = front > 0
    colours = COLOURS[front[painted] % len(COLOURS)]
    rgb[painted] = (1 - ALPHA) * rgb[painted] + ALPHA * colours
    # Rows = superior..inferior (flip z), columns = the remaining in-plane axis.
    picture = np.flipud(rgb.transpose(1, 0, 2)).astype(np.uint8)
    size = (max(1, round(picture.shape[1] * spacing[0])), max(1, round(picture.shape[0] * spacing[1])))
    return PILImage.fromarray(picture).resize(size, PILImage.Resampling.NEAREST)


def _frontmost(labels: np.ndarray, axis: int) -> np.ndarray:
    """First non-zero label along ``axis`` seen from its high end (anterior / left)."""
    flipped = np.flip(labels, axis=axis)
    hit = flipped > 0
    index = np.argmax(hit, axis=axis)
    first: np.ndarray = np.take_along_axis(flipped, np.expand_dims(index, axis), axis=axis).squeeze(axis)
    return first
