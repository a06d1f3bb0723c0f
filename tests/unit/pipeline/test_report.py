"""The run report's fields that the CLI tests do not reach: DICOM outputs, one output file."""

from __future__ import annotations

import pytest

from raytseg.pipeline.records import OutputOptions, SegmentOptions
from raytseg.pipeline.report import ReportedRun, device_name, run_report


def _run(output: str | None, files: OutputOptions, written: tuple[str, ...]) -> ReportedRun:
    options = SegmentOptions(task="total", roi_subset=("liver", "spleen"))
    classes = {1: "spleen", 5: "liver"}
    return ReportedRun("in.nii.gz", output, options, files, "cpu", classes, written, 1.234, {"model": 0.5})


def test_several_output_types_are_a_list_and_only_nifti_files_are_output_files() -> None:
    files = OutputOptions(output_type=("nifti", "dicom_seg"))
    written = ("out/liver.nii.gz", "out/segmentations.dcm", "out/spleen.nii.gz")
    report = run_report(_run("out", files, written))
    assert report["output_type"] == ["nifti", "dicom_seg"]
    assert report["output_files"] == ["liver.nii.gz", "spleen.nii.gz"]
    assert report["outputs"] == list(written)
    assert (report["roi_subset"], report["num_classes"]) == (["liver", "spleen"], 2)
    assert (report["runtime_seconds"], report["timings"]) == (1.23, {"model": 0.5})


def test_a_single_output_file_lists_no_folder_files() -> None:
    report = run_report(_run("seg.nii.gz", OutputOptions(ml=True), ("seg.nii.gz",)))
    assert (report["output_type"], report["multilabel"], report["output_files"]) == ("nifti", True, [])


DEVICES = [("gpu:1", "gpu"), ("cuda", "gpu"), ("cpu", "cpu"), ("mps", "mps")]


@pytest.mark.parametrize(("device", "name"), DEVICES)
def test_device_names_are_totalsegmentators(device: str, name: str) -> None:
    assert device_name(device) == name
