"""TotalSegmentator's classifier tools as one request, for the entry points that run them
without a command line of their own: jobs (``POST /v1/jobs`` with ``tool``) and batch
(``--tool``: one ``ToolRequest.file_name`` per item). The CLI's ``get-modality`` and
``get-phase`` and the service's ``/v1/modality`` and ``/v1/phase`` run the same functions
(``modality.modality_of``, ``phase.phase_of``).

A tool's answer is one JSON file, TotalSegmentator's byte for byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raytseg.errors import InvalidOptionError
from raytseg.pipeline.modality import ROI_SEGMENTATION, Segment, modality_of
from raytseg.pipeline.phase import BODY_SEGMENTATION, phase_of

if TYPE_CHECKING:
    from raytseg.pipeline.records import SegmentOptions, Volume

MODALITY_TOOL: Final = "get-modality"
PHASE_TOOL: Final = "get-phase"
ToolName = Literal["get-modality", "get-phase"]
TOOLS: tuple[ToolName, ...] = (MODALITY_TOOL, PHASE_TOOL)


class ToolRequest(BaseModel):
    """A classifier tool instead of a segmentation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ToolName = Field(
        description="get-modality (totalseg_get_modality: CT or MR?) or get-phase (totalseg_get_phase: "
        "a CT's contrast phase)."
    )
    normalized_intensities: bool = Field(
        default=False,
        description="get-modality's -n: the ROI-based classifier (segments with total_mr fast), for "
        "images whose intensities are not the scanner's.",
    )

    @model_validator(mode="after")
    def _normalizes_only_modality(self) -> ToolRequest:
        if self.normalized_intensities and self.name != MODALITY_TOOL:
            raise ValueError(f"normalized_intensities is an option of {MODALITY_TOOL} only: leave it out.")
        return self

    @property
    def file_name(self) -> str:
        """Its file in an output folder (batch), named as in TotalSegmentator's README."""
        return "contrast_phase.json" if self.name == PHASE_TOOL else "modality.json"

    @property
    def segmentations(self) -> tuple[SegmentOptions, ...]:
        """The segmentations the tool always runs (served here, else refused up front);
        get-phase also segments the neck's vessels of an image that holds a head."""
        if self.name == PHASE_TOOL:
            return (BODY_SEGMENTATION,)
        return (ROI_SEGMENTATION,) if self.normalized_intensities else ()


def run_label(task: str, tool: ToolRequest | None) -> str:
    """What a run is called in results, records and metrics' task tag: its task, or the
    tool's name."""
    return task if tool is None else tool.name


def answer_of(tool: ToolRequest, volume: Volume, segment: Segment | None) -> bytes:
    """The tool's JSON file for ``volume``; ``segment`` runs the segmentations it needs
    (None: the tool needs none, ``tool.segmentations`` is empty)."""
    if tool.name == PHASE_TOOL:
        assert segment is not None, "get-phase segments"
        return phase_of(volume, segment).to_json()
    return modality_of(volume, segment if tool.normalized_intensities else None).to_json()


def check_answer_location(tool: ToolRequest, location: str) -> None:
    """A tool writes one JSON file: ``location`` names it (TotalSegmentator's ``-o``)."""
    if not location.lower().endswith(".json"):
        raise InvalidOptionError(
            f"A {tool.name} run writes one JSON file: give its location ending in .json "
            f"(e.g. s3://bucket/results/{tool.name.removeprefix('get-')}.json), not {location!r}."
        )
