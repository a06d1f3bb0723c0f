"""The run report: TotalSegmentator 2.18's ``--report`` JSON, with raytseg's additions.

TotalSegmentator's keys, in its order and meaning (``python_api.build_run_report``), then
``raytseg_version``, ``timings`` (seconds per stage), ``backends`` (what ran each network,
torch or openvino, by model key), ``outputs`` (every location written, DICOMweb instances
included) and, for task ``auto``, ``task_choice`` (the task chosen, the modality and the
reason). ``totalsegmentator_version`` is the installed TotalSegmentator package whose data
files raytseg reads (None without one): raytseg does not run TotalSegmentator.
Written by ``raytseg segment --report``, returned in a job's record, stored per item in a
batch's results table.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raytseg.pipeline.records import OutputOptions, Segmentation, SegmentOptions, TaskChoice


@dataclass(frozen=True)
class ReportedRun:
    """What one run was asked, where it ran and what it wrote."""

    input: str  # a location, or "Nifti1Image" for an in-memory image (as TotalSegmentator)
    output: str | None
    options: SegmentOptions  # as run (a DICOM MR asked for "total" ran "total_mr")
    files: OutputOptions
    device: str  # gpu, cpu or mps
    classes: Mapping[int, str]  # the classes reported (roi_subset applied)
    written: Sequence[str]
    runtime_s: float
    timings: Mapping[str, float]
    task_choice: TaskChoice | None = None  # what task auto chose, and why
    backends: Mapping[str, str] = dataclasses.field(default_factory=dict)  # model key -> backend

    @classmethod
    def of(
        cls, seg: Segmentation, request: tuple[str, str | None], options: SegmentOptions, **run: Any
    ) -> ReportedRun:
        """The run that made ``seg`` from ``request`` (input, output); ``run``: files,
        device, written, runtime_s."""
        ran = options.model_copy(update={"task": seg.task})
        return cls(
            *request,
            ran,
            classes=seg.label_map,
            timings=seg.timings,
            task_choice=seg.task_choice,
            backends=seg.backends,
            **run,
        )


def run_report(run: ReportedRun) -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    from raytseg.tasks import get_task
    from raytseg.version import __version__

    task = get_task(run.options.task)
    kinds = list(run.files.output_type)
    chosen = {} if run.task_choice is None else {"task_choice": run.task_choice.to_dict()}
    return {
        "totalsegmentator_version": _version("TotalSegmentator"),
        "nnunetv2_version": _version("nnunetv2"),
        "torch_version": _version("torch"),
        "task": task.name,
        "modality": task.modality,
        "license_required": task.license_required,
        "device": run.device,
        "fast": run.options.fast,
        "fastest": run.options.fastest,
        "save_lowres": run.options.save_lowres,
        "multilabel": run.files.ml,
        "output_type": kinds[0] if len(kinds) == 1 else kinds,
        "roi_subset": None if run.options.roi_subset is None else list(run.options.roi_subset),
        "input": run.input,
        "output": run.output,
        "num_classes": len(run.classes),
        "classes": {str(k): name for k, name in run.classes.items()},
        "runtime_seconds": round(run.runtime_s, 2),
        "output_files": _nifti_names(run),
        "raytseg_version": __version__,
        "timings": {stage: round(seconds, 3) for stage, seconds in run.timings.items()},
        "backends": dict(run.backends),
        "outputs": list(run.written),
        **chosen,
    }


def report_json(run: ReportedRun) -> bytes:
    """The report file, indented as TotalSegmentator writes it."""
    return json.dumps(run_report(run), indent=2).encode()


def device_name(device: object) -> str:
    """``gpu``, ``cpu`` or ``mps`` for a torch device or a device option (``gpu:1`` -> ``gpu``)."""
    kind = str(getattr(device, "type", device)).split(":", 1)[0]
    return "gpu" if kind in ("cuda", "gpu") else kind


def _nifti_names(run: ReportedRun) -> list[str]:
    """The .nii.gz files written into the output folder (TotalSegmentator lists the folder's)."""
    if run.output is None or run.output.endswith((".nii", ".nii.gz", ".dcm")):
        return []
    return sorted(posixpath.basename(w) for w in run.written if w.endswith(".nii.gz"))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
