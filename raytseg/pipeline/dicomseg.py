"""DICOM-SEG output, written with highdicom.

One segment per class present in the labels, numbered 1..n in the label map's order, with
the class name as label, TotalSegmentator's SNOMED-CT codes and colour
(``raytseg.pipeline.coding``) and raytseg as the algorithm. BINARY (one 1-bit frame per
segment and slice, as TotalSegmentator writes) or LABELMAP (one frame per slice,
RLE Lossless), on the source slices' grid and referencing them.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np

from raytseg.errors import DicomOutputError
from raytseg.pipeline.coding import coding_of
from raytseg.pipeline.dicomsource import DicomSource
from raytseg.pipeline.records import Segmentation

SegType = Literal["binary", "labelmap"]
MANUFACTURER = "raytseg"
SERIES_NUMBER = 100  # TotalSegmentator's


def dicom_seg_bytes(seg: Segmentation, source: DicomSource, kind: SegType) -> bytes:
    """The DICOM-SEG file (Part 10 bytes) of ``seg`` on its DICOM input ``source``."""
    import highdicom as hd
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    numbers = _segment_numbers(seg, source.present)
    lookup = np.zeros(256, dtype=np.uint16)
    for label, number in numbers.items():
        lookup[label] = number
    document = hd.seg.Segmentation(
        source_images=list(source.slices),
        pixel_array=lookup[source.frames],
        segmentation_type=kind.upper(),
        segment_descriptions=[_description(seg, label, number) for label, number in numbers.items()],
        transfer_syntax_uid=RLELossless if kind == "labelmap" else ExplicitVRLittleEndian,
        **_identity(seg, source, kind),
    )
    buffer = io.BytesIO()
    dcmwrite(buffer, document, enforce_file_format=True)
    return buffer.getvalue()


def _identity(seg: Segmentation, source: DicomSource, kind: SegType) -> dict[str, Any]:
    """The new series and instance, and who made them."""
    return {
        "series_instance_uid": source.uid(f"seg-series-{kind}"),
        "series_number": SERIES_NUMBER,
        "sop_instance_uid": source.uid(f"seg-{kind}"),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": f"{MANUFACTURER} {seg.task}",
        "software_versions": _version(),
        "device_serial_number": "1",
        "series_description": f"{seg.task} ({MANUFACTURER})",
    }


def _segment_numbers(seg: Segmentation, present: frozenset[int]) -> dict[int, int]:
    """Segment number of each label present, 1..n in label map order (TotalSegmentator's)."""
    labels = [label for label in seg.label_map if label in present]
    if not labels:
        raise DicomOutputError(
            "No class was found in this image, and a DICOM-SEG must hold at least one segment. "
            "Ask for output_type nifti to get the empty result."
        )
    return {label: number for number, label in enumerate(labels, start=1)}


def _description(seg: Segmentation, label: int, number: int) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    name = seg.label_map[label]
    coding = coding_of(name)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=_concept(coding.category),
        segmented_property_type=_concept(coding.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=MANUFACTURER,
            version=_version(),
            family=codes.DCM.ArtificialIntelligence,
            parameters={"task": seg.task},
        ),
        display_color=None if coding.rgb is None else hd.color.CIELabColor.from_rgb(*coding.rgb),
    )


def _concept(code: Any) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _version() -> str:
    from raytseg.version import __version__

    return __version__


__all__ = ["SegType", "dicom_seg_bytes"]
