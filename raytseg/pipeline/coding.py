"""What DICOM outputs call each class: SNOMED-CT codes and display colours.

TotalSegmentator ships them in ``resources/totalsegmentator_snomed_mapping.csv``; raytseg
reads that file where ``raytseg.resources`` finds it and never copies it. Classes the
mapping lacks get TotalSegmentator's fallback, SCT "Tissue".
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

from raytseg.resources import resource_path

MAPPING_FILE = "totalsegmentator_snomed_mapping.csv"
_COLUMN = "SegmentedProperty{}CodeSequence.{}"


@dataclass(frozen=True)
class Code:
    """One coded concept (DICOM's CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


TISSUE = Code("85756007", "SCT", "Tissue")


@dataclass(frozen=True)
class ClassCoding:
    """A class's segmented property category and type, and its display colour (sRGB)."""

    category: Code
    type: Code
    rgb: tuple[int, int, int] | None


FALLBACK = ClassCoding(TISSUE, TISSUE, None)


def coding_of(name: str) -> ClassCoding:
    """The coding of class ``name`` (TotalSegmentator's fallback where it has none)."""
    return class_codings().get(name, FALLBACK)


@functools.cache
def class_codings() -> dict[str, ClassCoding]:
    """Every class the mapping names, read once per process."""
    with mapping_path().open(newline="") as f:
        return {row["Structure"]: _coding(row) for row in csv.DictReader(f)}


def mapping_path() -> Path:
    """TotalSegmentator's mapping file (``raytseg.resources``)."""
    return resource_path(MAPPING_FILE, "DICOM output (else ask for output_type nifti)")


def _coding(row: dict[str, str]) -> ClassCoding:
    return ClassCoding(_code(row, "Category"), _code(row, "Type"), _rgb(row.get("DicomRGBColor", "")))


def _code(row: dict[str, str], kind: str) -> Code:
    return Code(
        value=row[_COLUMN.format(kind, "CodeValue")],
        scheme=row[_COLUMN.format(kind, "CodingSchemeDesignator")],
        meaning=row[_COLUMN.format(kind, "CodeMeaning")],
    )


def _rgb(text: str) -> tuple[int, int, int] | None:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    r, g, b = (min(255, int(p)) for p in parts)
    return (r, g, b)
