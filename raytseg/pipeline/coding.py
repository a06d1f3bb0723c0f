"""What DICOM outputs call each class: SNOMED-CT codes and display colours.

TotalSegmentator ships them in ``resources/totalsegmentator_snomed_mapping.csv``; raytseg
reads that file where the TotalSegmentator package is installed (``pip install --no-deps
TotalSegmentator==2.18.0`` puts it there without TotalSegmentator's dependencies) and never
copies it. Classes the mapping lacks get TotalSegmentator's fallback, SCT "Tissue".
"""

from __future__ import annotations

import csv
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from raytseg.errors import MissingResourceError

MAPPING_FILE = "totalsegmentator_snomed_mapping.csv"
INSTALL_HINT = "pip install --no-deps TotalSegmentator==2.18.0"
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
    """The mapping file of the installed TotalSegmentator package (it is not imported)."""
    spec = importlib.util.find_spec("totalsegmentator")
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = Path(folder) / "resources" / MAPPING_FILE
        if path.is_file():
            return path
    raise MissingResourceError(
        f"DICOM outputs take their SNOMED-CT codes from TotalSegmentator's {MAPPING_FILE}, and no "
        f"installed TotalSegmentator package has it. Install it with `{INSTALL_HINT}`, or ask for "
        "output_type nifti."
    )


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
