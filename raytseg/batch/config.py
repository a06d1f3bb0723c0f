"""The batch job's configuration: one pydantic model, from CLI flags or a YAML file.

    input: s3://bucket/cts/            # a prefix to list, a manifest (.csv, .parquet, .jsonl)
                                       # or a DICOMweb study/search (dicomweb+https://...)
    output: s3://bucket/segmentations/
    task: total
    fast: true
    ml: false
    max_failures: 0.05                 # a count (5) or a fraction of the items (0.05)
    model: {concurrency: [1, 2], num_gpus: 0.5}
    storage: {endpoint_url: https://minio.internal:9000}

Segmentation options are the fields of ``SegmentOptions`` (``fast``, ``roi_subset``,
``statistics``...), spelled and validated the same way. Unknown keys are rejected.
Credentials never appear here: storage is reached through the standard chain of the
filesystem library (for S3: env, shared files, instance/pod roles).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from raytseg import configfile, storage
from raytseg.config import Backend, Device, check_backend
from raytseg.configfile import Strict
from raytseg.errors import InvalidOptionError
from raytseg.options import refuse_placed
from raytseg.pipeline.export import check_model_grid
from raytseg.pipeline.records import OutputOptions, SegmentOptions
from raytseg.pipeline.tools import ToolRequest

RESULTS_NAME = "_results.parquet"
STAGING_NAME = "_staging"


class CpuStageConfig(Strict):
    """A CPU stage (read + preprocess, or postprocess + write): stateless Ray tasks."""

    num_cpus: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per task.")
    concurrency: int | None = Field(
        default=None, ge=1, description="At most this many tasks at once (default: as CPUs allow)."
    )


class ModelStageConfig(Strict):
    """The model stage: an actor pool whose actors load the networks once."""

    concurrency: tuple[int, int] = Field(
        default=(1, 1), description="(min, max) actors; the pool autoscales between them."
    )
    num_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs per actor (a fraction shares a GPU). With crop passes the share is split "
        "evenly between the model stages (one per pass).",
    )
    num_cpus: float = Field(
        default=1.0, gt=0, description="CPUs per actor, split like num_gpus between the model stages."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads per actor (default: 1 on a GPU; on a CPU the node's cores / max actors).",
    )

    @field_validator("concurrency")
    @classmethod
    def _min_le_max(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1 or high < low:
            raise ValueError(f"concurrency must be (min, max) with 1 <= min <= max, not {value}")
        return value


class StorageConfig(Strict):
    """How storage is reached; credentials come from the standard chain, never from here."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, Ceph...); AWS_ENDPOINT_URL in the env works too.",
    )
    retries: int = Field(default=4, ge=0, description="Retries of a transient storage error.")
    retry_delay_s: float = Field(
        default=0.5, gt=0, description="First retry delay; doubles each retry (with jitter)."
    )


MaxFailures = Annotated[
    int | float,
    Field(description="Failed items tolerated: a count (int) or a fraction of all items (float 0..1)."),
]


class BatchConfig(SegmentOptions, OutputOptions):
    """A batch segmentation job: what to read, what to run, where to write, how to run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(
        description="Prefix (folder or URI) to list, a manifest .csv/.parquet/.jsonl, or a DICOMweb "
        "study or QIDO-RS search (dicomweb+https://host/prefix/series?Modality=CT)."
    )
    output: str = Field(description="Where <id>/ folders and the results table are written.")
    results: str | None = Field(default=None, description=f"Results table (default <output>/{RESULTS_NAME}).")
    device: Device = Field(default="gpu", description="cpu, gpu, gpu:N or mps (no GPU: CPU).")
    backend: Backend = Field(
        default="auto", description="What runs the networks: torch, openvino (device cpu only) or auto."
    )
    overwrite: bool = Field(default=False, description="Recompute items that are already complete.")
    max_failures: MaxFailures = 0
    retries: int = Field(default=3, ge=0, description="Retries of an item whose worker process died.")
    read: CpuStageConfig = CpuStageConfig()
    model: ModelStageConfig = ModelStageConfig()
    write: CpuStageConfig = CpuStageConfig()
    storage: StorageConfig = StorageConfig()
    address: str | None = Field(default=None, description="Ray cluster to join; default: start a local one.")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the local Ray (default: all).")
    object_store_mb: int = Field(default=500, ge=100, description="Object store of the local Ray, MB.")
    no_progress_timeout_s: float | None = Field(
        default=3600.0, gt=0, description="Abort when no stage finishes any item for this long (None: never)."
    )
    tool: ToolRequest | None = Field(
        default=None,
        description="A classifier tool instead of a segmentation (get-modality, get-phase): each item's "
        "folder gets the tool's JSON file; no segmentation options then.",
    )

    @field_validator("max_failures")
    @classmethod
    def _check_max_failures(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(f"a fraction of failures must be within 0..1, not {value}")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a count of failures cannot be negative ({value})")
        return value

    @model_validator(mode="after")
    def _a_tool_takes_no_segmentation_options(self) -> BatchConfig:
        asked = self.model_fields_set & (
            SegmentOptions.model_fields.keys() | OutputOptions.model_fields.keys()
        )
        if self.tool is not None and asked:
            raise ValueError(
                f"a {self.tool.name} job segments what the tool needs: leave out {', '.join(sorted(asked))}"
            )
        return self

    @model_validator(mode="after")
    def _check_device(self) -> BatchConfig:
        if self.model.num_gpus > 0 and self.device in ("cpu", "mps"):
            raise ValueError(f"model.num_gpus is {self.model.num_gpus} but device is {self.device!r}")
        check_backend(self.backend, self.device)
        return self

    @property
    def results_uri(self) -> str:
        return self.results or storage.join(self.output, RESULTS_NAME)

    @property
    def staging_uri(self) -> str:
        return storage.join(self.output, STAGING_NAME)

    def segment_options(self, task: str | None = None) -> SegmentOptions:
        """The segmentation options of an item (``task`` overrides the job's task)."""
        fields = self.model_dump(include=set(SegmentOptions.model_fields))
        if task is not None:
            fields["task"] = task
        return SegmentOptions.model_validate(fields)

    @property
    def output_options(self) -> OutputOptions:
        return OutputOptions.model_validate(self.model_dump(include=set(OutputOptions.model_fields)))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> BatchConfig:
        """The config in YAML file ``path`` (if any), with ``overrides`` (CLI flags) on top of it."""
        data = configfile.merged(configfile.read_yaml(path, "batch job config") if path else {}, overrides)
        refuse_placed(data)  # each item's files go beside its masks, never to one path (-s PATH)
        config = configfile.validated(cls, data, "batch job options")
        # Before any item: outputs -sl cannot give (items of another task are checked again).
        check_model_grid(config.segment_options(), config.output_options)
        return config


def parse_max_failures(text: str) -> int | float:
    """``--max-failures``: ``5`` (a count), ``0.05`` or ``5%`` (a fraction of the items)."""
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return int(text) if text.isdigit() else float(text)
    except ValueError as exc:
        raise InvalidOptionError(
            f"--max-failures takes a count (5) or a fraction (0.05 or 5%), not {text!r}."
        ) from exc


def failures_exceeded(failed: int, total: int, limit: int | float) -> bool:
    """True when ``failed`` items out of ``total`` are more than ``limit`` allows."""
    if isinstance(limit, float):
        return failed > limit * total
    return failed > limit
