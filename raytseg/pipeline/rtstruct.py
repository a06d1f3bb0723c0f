"""RTSTRUCT output, written with rt-utils.

One ROI per class present, named after the class and coloured as TotalSegmentator colours
it (``raytseg.pipeline.coding``). rt-utils traces each slice's mask with OpenCV; where a
structure is one pixel or a straight line of pixels the trace has fewer than three points,
which is no polygon (a known rt-utils problem): such a contour is replaced by the rectangle
around its pixels. The structure set gets raytseg's identity and deterministic UIDs
(rt-utils would give random ones), and the type 2 attributes rt-utils leaves out.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from raytseg.pipeline.coding import coding_of
from raytseg.pipeline.dicomgrid import cosines, position
from raytseg.pipeline.dicomsource import DicomSource
from raytseg.pipeline.records import Segmentation

_MIN_POINTS = 3  # a closed planar contour needs a polygon


def rtstruct_bytes(seg: Segmentation, source: DicomSource) -> bytes:
    """The RTSTRUCT file (Part 10 bytes) of ``seg`` on its DICOM input ``source``."""
    from rt_utils import RTStruct
    from rt_utils.ds_helper import create_rtstruct_dataset

    slices = list(source.slices)  # rt-utils sorts a series the same way: along the normal
    structure = RTStruct(slices, create_rtstruct_dataset(slices))
    for label, name in seg.label_map.items():
        if label in source.present:
            mask = np.ascontiguousarray((source.frames == label).transpose(1, 2, 0))  # rows, cols, slices
            rgb = coding_of(name).rgb
            structure.add_roi(mask=mask, name=name, color=None if rgb is None else list(rgb))
    _finish(structure.ds, source, seg)
    buffer = io.BytesIO()
    structure.ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _finish(ds: Any, source: DicomSource, seg: Segmentation) -> None:
    from raytseg.version import __version__

    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = source.uid("rtstruct")
    ds.SeriesInstanceUID = source.uid("rtstruct-series")
    ds.Manufacturer = ds.ManufacturerModelName = "raytseg"
    ds.SoftwareVersions = __version__
    ds.SeriesDescription = ds.StructureSetLabel = f"{seg.task} (raytseg)"
    del ds.InstitutionName  # rt-utils writes its authors' institution
    first = source.slices[0]
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    for keyword in ("AccessionNumber", "ReferringPhysicianName", "OperatorsName"):
        setattr(ds, keyword, first.get(keyword, ""))
    by_uid = {str(s.SOPInstanceUID): s for s in source.slices}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            _fix_contour(contour, by_uid)


def _fix_contour(contour: Any, slices: dict[str, Any]) -> None:
    # Only degenerate contours are rewritten: every DS value set costs pydicom a parse and a
    # validation, and a noisy mask has 10^5 contours (this was half the RTSTRUCT's time).
    count = len(contour.ContourData) // 3
    if count < _MIN_POINTS:
        image = slices[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        points = _pixel_rectangle(np.asarray(contour.ContourData, dtype=float).reshape(-1, 3), image)
        contour.ContourData = [float(v) for v in points.ravel()]
        count = len(points)
    contour.NumberOfContourPoints = count  # rt-utils writes a float


def _pixel_rectangle(points: np.ndarray, image: Any) -> np.ndarray:
    """The corners of the pixels a degenerate contour passes through, as a closed polygon."""
    along_row, along_column = cosines(image)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    origin = position(image)
    u = (points - origin) @ along_row / column_spacing
    v = (points - origin) @ along_column / row_spacing
    corners = [(u.min() - 0.5, v.min() - 0.5), (u.max() + 0.5, v.min() - 0.5)]
    corners += [(u.max() + 0.5, v.max() + 0.5), (u.min() - 0.5, v.max() + 0.5)]
    return np.array(
        [origin + a * column_spacing * along_row + b * row_spacing * along_column for a, b in corners]
    )
