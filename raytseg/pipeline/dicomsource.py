"""The source slices as DICOM outputs reference them: placed, complete and uniquely named.

Outputs copy the patient and study of their source and reference each slice by its UIDs.
Anonymisers often empty those UIDs (the reference series of TotalSegmentator's test suite
has empty Study, Series and SOP Instance UIDs, and TotalSegmentator's own DICOM-SEG of it
fails validation). Each missing UID is taken from the file meta where it is kept there,
else derived deterministically from what the slices do hold, with a warning.

Output UIDs are deterministic too: the same labels from the same series give the same
SOP Instance UID, so storing a result twice replaces it instead of duplicating it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytseg.pipeline.axes import to_frames
from raytseg.pipeline.dicomgrid import SliceGrid, slice_grid
from raytseg.pipeline.records import Segmentation

log = logging.getLogger(__name__)

# SOP classes by modality, for slices whose SOPClassUID and file meta are both empty.
_STORAGE_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Type 2 attributes (present, may be empty) of the modules outputs copy from the source.
_TYPE2 = (
    *("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    *("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"),
)


@dataclass(frozen=True)  # cached_property needs a __dict__: no slots
class DicomSource:
    """What a DICOM output needs of its input: slices in frame order, and the labels as frames."""

    slices: tuple[Any, ...]  # repaired copies, sorted along the slice normal
    frames: np.ndarray  # the segmentation's labels as (slice, row, column)

    @functools.cached_property
    def present(self) -> frozenset[int]:
        """The label ids the frames hold (0 included where present)."""
        counts = np.bincount(self.frames.ravel(), minlength=256)
        return frozenset(np.flatnonzero(counts).tolist())

    def uid(self, kind: str) -> str:
        """A UID for output ``kind`` that depends only on the source slices and the labels."""
        from pydicom.uid import generate_uid

        digest = hashlib.sha256(np.ascontiguousarray(self.frames).data).hexdigest()
        slices = [str(ds.SOPInstanceUID) for ds in self.slices]
        return str(generate_uid(entropy_srcs=[kind, digest, *slices]))


def dicom_source(seg: Segmentation, series: tuple[Any, ...]) -> DicomSource:
    grid: SliceGrid = slice_grid(series, seg.affine, seg.labels.shape)
    return DicomSource(_repaired(grid.slices), to_frames(seg.labels, grid))


def _repaired(slices: tuple[Any, ...]) -> tuple[Any, ...]:
    repaired = tuple(copy.deepcopy(ds) for ds in slices)
    filled: set[str] = set()
    for ds in repaired:
        filled |= _fill_instance(ds)
    filled |= _fill_shared(repaired)
    if filled:
        log.warning(
            "The source series has empty %s; the DICOM outputs use UIDs from the file meta or "
            "derived from the slices (they may then refer to a study the archive does not hold).",
            ", ".join(sorted(filled)),
        )
    return repaired


def _fill_instance(ds: Any) -> set[str]:
    from pydicom.uid import generate_uid

    meta = getattr(ds, "file_meta", None)
    filled = set()
    if not ds.get("SOPClassUID"):
        modality = str(ds.get("Modality") or "")
        ds.SOPClassUID = _meta(meta, "MediaStorageSOPClassUID") or _STORAGE_CLASS.get(
            modality, _SECONDARY_CAPTURE
        )
        filled.add("SOPClassUID")
    if not ds.get("SOPInstanceUID"):
        position = [str(v) for v in ds.get("ImagePositionPatient") or []]
        ds.SOPInstanceUID = _meta(meta, "MediaStorageSOPInstanceUID") or generate_uid(
            entropy_srcs=[str(ds.get("FrameOfReferenceUID") or ""), *position]
        )
        filled.add("SOPInstanceUID")
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return filled


def _fill_shared(slices: tuple[Any, ...]) -> set[str]:
    """Study and series UIDs every slice must share, derived from the slices' own UIDs."""
    from pydicom.uid import generate_uid

    instances = sorted(str(ds.SOPInstanceUID) for ds in slices)
    filled = set()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not all(ds.get(keyword) for ds in slices):
            uid = next((ds.get(keyword) for ds in slices if ds.get(keyword)), None)
            uid = uid or generate_uid(entropy_srcs=[keyword, *instances])
            for ds in slices:
                setattr(ds, keyword, uid)
            filled.add(keyword)
    return filled


def _meta(meta: Any, keyword: str) -> str | None:
    value = None if meta is None else meta.get(keyword)
    return str(value) if value else None
