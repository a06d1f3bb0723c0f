"""The HTTP API's request and response models (what ``/docs`` shows).

Option names and defaults are TotalSegmentator's (``SegmentOptions``). Unknown query
parameters and JSON fields are refused, so a typo (``fsat=true``) is an error, not a
silently slower request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raytseg.errors import InvalidOptionError
from raytseg.pipeline.records import SegmentOptions


class OptionFields(BaseModel):
    """Segmentation options shared by ``POST /v1/segment`` (query) and ``POST /v1/jobs`` (JSON)."""

    model_config = ConfigDict(extra="forbid")

    fast: bool = Field(default=False, description="3 mm model (total, total_mr) / 6 mm (body).")
    fastest: bool = Field(default=False, description="6 mm model (total, total_mr).")
    roi_subset: list[str] | None = Field(
        default=None, description="Only these classes; repeat the parameter or separate with commas."
    )
    robust_crop: bool = Field(default=False, description="Find crop regions with the 3 mm model.")
    body_seg: bool = Field(default=False, description="Crop to the body first (CT).")
    force_split: bool = Field(default=False, description="Predict in three overlapping z chunks.")
    ml: bool = Field(default=True, description="One multilabel NIfTI (true) or a zip of per-class masks.")
    statistics: bool = Field(default=False, description="Add statistics.json (the answer becomes a zip).")
    stats_include_incomplete: bool = False
    stats_aggregation: Literal["mean", "median"] = "mean"
    remove_small_blobs: float | None = Field(default=None, gt=0, description="Drop blobs below this (mm³).")

    def options(self, task: str) -> SegmentOptions:
        """The pipeline's options; invalid combinations raise ``InvalidOptionError``."""
        rois = None
        if self.roi_subset is not None:
            rois = tuple(n.strip() for item in self.roi_subset for n in item.split(",") if n.strip())
        fields = self.model_dump(exclude={"ml", "roi_subset", "task"})
        try:
            return SegmentOptions(task=task, roi_subset=rois, **fields)
        except ValidationError as exc:
            raise InvalidOptionError(f"Invalid options: {exc.errors()[0]['msg']}") from None


class SegmentQuery(OptionFields):
    """Query parameters of ``POST /v1/segment``."""

    task: str = Field(default="total", description="Task name (GET /v1/tasks).")


class JobRequest(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    input_uri: str = Field(description="NIfTI file, DICOM zip or DICOM folder/prefix (fsspec URI or path).")
    output_uri: str = Field(
        description="Output folder/prefix; with ml also a .nii.gz file (else <folder>/seg.nii.gz)."
    )
    task: str = "total"
    options: OptionFields = OptionFields()


class JobStatus(BaseModel):
    """``GET /v1/jobs/{id}``: state and, once done, the written locations or the error."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed"]
    task: str
    input_uri: str
    output_uri: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    outputs: list[str]
    error: dict[str, Any] | None


class TaskInfo(BaseModel):
    """One catalogue task and how this deployment serves it."""

    name: str
    modality: str
    license_required: bool
    modes: list[str]
    classes: dict[int, str]
    served_modes: list[str] = Field(description="Modes served here (empty: not served).")
    dedicated: bool = Field(description="Its models have deployments of their own (else: shared pool).")


class ErrorDetail(BaseModel):
    type: str
    message: str
    status: int


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"type", "message", "status"}}``."""

    error: ErrorDetail
