"""The batch command line: flags over a config file, import hygiene, progress output."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pytest

from raytseg.batch.cli import add_arguments, config_from_args, register
from raytseg.batch.config import BatchConfig
from raytseg.batch.progress import ProgressPrinter
from raytseg.batch.results import BatchReport, ItemResult, JobProgress
from raytseg.errors import InvalidOptionError
from raytseg.pipeline.tools import ToolRequest


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_importing_the_cli_imports_neither_ray_nor_torch() -> None:
    code = "import sys, raytseg.batch.cli, raytseg.batch; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_register_adds_the_batch_subcommand() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", "--input", "s3://b/in", "--output", "s3://b/out", "--fast"])
    assert args.handler.__name__ == "run_command"
    config = config_from_args(args)
    assert (config.input, config.output, config.fast, config.task) == (
        "s3://b/in",
        "s3://b/out",
        True,
        "total",
    )


def test_segment_flags_map_to_the_config() -> None:
    args = parse(
        "--input", "in", "--output", "out", "-ta", "total_mr", "-rsr", "liver", "spleen", "-ml", "-s",
        "-ndm", "-d", "cpu", "--max-failures", "5%", "--model-concurrency", "1", "3", "--overwrite",
    )  # fmt: skip
    config = config_from_args(args)
    assert config.segment_options().model_dump() == {
        **BatchConfig(input="i", output="o").segment_options().model_dump(),
        "task": "total_mr",
        "roi_subset": ("liver", "spleen"),
        "robust_crop": True,
        "statistics": True,
    }
    assert (config.ml, config.derived_masks, config.device, config.overwrite) == (True, False, "cpu", True)
    assert (config.max_failures, config.model.concurrency) == (0.05, (1, 3))


def test_tool_flags_map_to_the_config_and_refuse_segmentation_flags(tmp_path: Path) -> None:
    config = config_from_args(parse("--input", "in", "--output", "out", "--tool", "get-modality", "-n"))
    assert config.tool is not None
    assert (config.tool.name, config.tool.normalized_intensities) == ("get-modality", True)
    job = tmp_path / "job.yaml"
    job.write_text("input: in\noutput: out\ntool: {name: get-phase}\n")
    assert config_from_args(parse("--config", str(job))).tool == ToolRequest(name="get-phase")
    with pytest.raises(InvalidOptionError, match="leave out fast"):
        config_from_args(parse("--config", str(job), "--fast"))


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "input: s3://b/in\noutput: s3://b/out\nfast: true\nmodel: {num_gpus: 0.25}\nmax_failures: 3\n"
    )
    config = config_from_args(parse("--config", str(job), "--num-gpus", "0.5", "--max-failures", "0"))
    assert (config.input, config.fast, config.model.num_gpus, config.max_failures) == (
        "s3://b/in",
        True,
        0.5,
        0,
    )


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(InvalidOptionError, match="--input and --output"):
        config_from_args(parse("--fast"))
    with pytest.raises(InvalidOptionError, match="device"):
        config_from_args(parse("--input", "i", "--output", "o", "-d", "tpu"))


def result(item_id: str, status: str) -> ItemResult:
    error = (
        ("UnreadableImageError", "x.nii.gz is not an image.\nmore") if status == "failed" else (None, None)
    )
    return ItemResult(item_id, "in", "out", "total", status, *error)  # type: ignore[arg-type]


def test_progress_log_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=False, interval_s=3600)
    progress = JobProgress(total=3)
    for item_id, status in (("a", "skipped"), ("b", "failed"), ("c", "ok")):
        progress.add(result(item_id, status))
        printer.update(progress, result(item_id, status))
    printer.close(
        BatchReport((result("a", "skipped"), result("b", "failed"), result("c", "ok")), "out/r", 7.0, True)
    )
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("1/3  ok 0  failed 0  skipped 1")  # the first update, then throttled
    assert lines[1] == "failed b: UnreadableImageError: x.nii.gz is not an image."
    assert lines[2].startswith("3/3  ok 1  failed 1  skipped 1")  # the last one always shows
    assert lines[3].startswith("3 item(s): 1 ok, 1 failed, 1 skipped in 7s")
    assert "Results: out/r" in lines[3]


def test_progress_bar_in_a_terminal() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=True)
    progress = JobProgress(total=4)
    progress.add(result("a", "ok"))
    printer.update(progress, result("a", "ok"))
    assert stream.getvalue().startswith("\r[#####---------------]  1/4  ok 1")
    assert "/h  ETA " in stream.getvalue()


def test_backend_flag_overrides_the_config_and_is_checked_against_the_device() -> None:
    config = config_from_args(parse("--input", "in", "--output", "out", "-d", "cpu", "--backend", "openvino"))
    assert (config.backend, config.device) == ("openvino", "cpu")
    assert config_from_args(parse("--input", "in", "--output", "out")).backend == "auto"
    with pytest.raises(InvalidOptionError, match="backend openvino runs on the CPU"):
        config_from_args(parse("--input", "in", "--output", "out", "--backend", "openvino"))
