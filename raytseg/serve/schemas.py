"""The HTTP API's request and response models (what ``/docs`` shows).

The options are derived from ``SegmentOptions`` and ``OutputOptions`` (``raytseg.options``):
TotalSegmentator's names and defaults, except that ``ml`` is true by default (the answer
is one NIfTI). Unknown query parameters and JSON fields are refused, so a typo
(``fsat=true``) is an error, not a silently slower request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raytseg.options import HttpOptions, http_model
from raytseg.pipeline.records import SegmentOptions
from raytseg.pipeline.tools import ToolRequest

if TYPE_CHECKING:  # built at run time; their fields are the records' (checked by the tests)
    SegmentQuery = HttpOptions
    JobOptions = HttpOptions
else:
    # The query string of POST /v1/segment: the answer is the files; storing them on a
    # DICOMweb server is for jobs, whose locations the allow-list checks.
    SegmentQuery = http_model("SegmentQuery", exclude=frozenset({"dicomweb_store"}))
    JobOptions = http_model("JobOptions", exclude=frozenset({"task"}))  # a job names its task beside them


class JobRequest(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    input_uri: str = Field(
        description="NIfTI file, DICOM zip, DICOM folder/prefix (fsspec URI or path) or DICOMweb series "
        "(dicomweb+https://host/prefix/studies/<uid>/series/<uid>)."
    )
    output_uri: str = Field(
        description="Output folder/prefix; with ml also a .nii.gz file (else <folder>/segmentation.nii.gz)."
    )
    task: str = Field(default="total", description=SegmentOptions.model_fields["task"].description)
    options: JobOptions = Field(default_factory=JobOptions)
    tool: ToolRequest | None = Field(
        default=None,
        description="A classifier tool instead of a segmentation (no task or options then): its JSON "
        "answer, TotalSegmentator's file, is written to output_uri (ending in .json).",
    )

    @model_validator(mode="after")
    def _a_tool_takes_no_segmentation_options(self) -> JobRequest:
        if self.tool is not None and {"task", "options"} & self.model_fields_set:
            raise ValueError(
                f"A {self.tool.name} job segments what the tool needs: leave out task and options."
            )
        return self


class JobStatus(BaseModel):
    """``GET /v1/jobs/{id}``: state and, once done, the written locations or the error."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed"]
    task: str = Field(description="The segmentation's task, or the tool's name.")
    tool: str | None = Field(default=None, description="The classifier tool the job runs, if any.")
    input_uri: str
    output_uri: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    outputs: list[str]
    error: dict[str, Any] | None
    report: dict[str, Any] | None = Field(
        default=None, description="Once succeeded: the run report (TotalSegmentator's --report JSON)."
    )
    answer: dict[str, Any] | None = Field(
        default=None, description="Once a tool job succeeded: its JSON answer (also in outputs[0])."
    )


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
