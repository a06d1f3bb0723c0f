"""The job config: validation, YAML with overrides, max-failures forms."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from raytseg.batch.config import BatchConfig, failures_exceeded, parse_max_failures
from raytseg.errors import InvalidOptionError


def test_defaults_and_derived_locations() -> None:
    config = BatchConfig(input="s3://b/in", output="s3://b/out/")
    assert (config.task, config.fast, config.ml, config.max_failures, config.retries) == (
        "total",
        False,
        False,
        0,
        3,
    )
    assert config.model.concurrency == (1, 1)
    assert config.results_uri == "s3://b/out/_results.parquet"
    assert config.staging_uri == "s3://b/out/_staging"
    assert BatchConfig(input="i", output="o", results="r.parquet").results_uri == "r.parquet"


@pytest.mark.parametrize(
    "bad",
    [
        {"unknown_key": 1},
        {"model": {"concurrency": [2, 1]}},
        {"model": {"concurrency": [0, 1]}},
        {"model": {"num_gpus": -1}},
        {"model": {"gpus": 1}},  # a typo inside a section is caught too
        {"storage": {"aws_secret_access_key": "x"}},  # no place for credentials
        {"device": "cuda"},
        {"device": "cpu", "model": {"num_gpus": 0.5}},
        {"max_failures": -1},
        {"max_failures": 1.5},
        {"remove_small_blobs": 0},
        {"stats_aggregation": "max"},
    ],
)
def test_invalid_configs_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BatchConfig.model_validate({"input": "i", "output": "o", **bad})


def test_segment_options_per_item() -> None:
    config = BatchConfig(input="i", output="o", fast=True, roi_subset=("liver",), statistics=True)
    options = config.segment_options()
    assert (options.task, options.fast, options.roi_subset, options.statistics) == (
        "total",
        True,
        ("liver",),
        True,
    )
    assert config.segment_options("total_mr").task == "total_mr"


def test_yaml_file_with_overrides_merges_sections(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: s3://b/in\noutput: s3://b/out\nfast: true\n"
        "model: {num_gpus: 0.5, concurrency: [1, 4]}\nstorage: {endpoint_url: 'http://127.0.0.1:9000'}\n"
    )
    config = BatchConfig.load(path, {"model": {"concurrency": (2, 2)}, "ml": True})
    assert (config.fast, config.ml) == (True, True)
    assert (config.model.num_gpus, config.model.concurrency) == (0.5, (2, 2))
    assert config.storage.endpoint_url == "http://127.0.0.1:9000"


def test_unreadable_yaml_is_an_option_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="Cannot read"):
        BatchConfig.load(tmp_path / "missing.yaml", {})
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InvalidOptionError, match="mapping"):
        BatchConfig.load(tmp_path / "list.yaml", {})


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("5", 5), ("0.05", 0.05), ("5%", 0.05), ("1.0", 1.0)])
def test_max_failures_forms(text: str, value: float) -> None:
    parsed = parse_max_failures(text)
    assert parsed == value
    assert type(parsed) is type(value)


def test_max_failures_rejects_words() -> None:
    with pytest.raises(InvalidOptionError, match="count"):
        parse_max_failures("some")


@pytest.mark.parametrize(
    ("failed", "total", "limit", "exceeded"),
    [
        (0, 10, 0, False),
        (1, 10, 0, True),
        (2, 10, 2, False),
        (3, 10, 2, True),
        (1, 10, 0.1, False),
        (2, 10, 0.1, True),
    ],
)
def test_failures_exceeded(failed: int, total: int, limit: float, exceeded: bool) -> None:
    assert failures_exceeded(failed, total, limit) is exceeded


def test_save_lowres_outputs_are_checked_before_any_item() -> None:
    lowres = {"input": "in/", "output": "out/", "fast": True, "save_lowres": True}
    with pytest.raises(InvalidOptionError, match="the preview"):
        BatchConfig.load(None, {**lowres, "preview": True})
    assert BatchConfig.load(None, lowres).segment_options().save_lowres


@pytest.mark.parametrize(
    ("asked", "words"),
    [
        ({"tool": {"name": "get-phase"}, "fast": True}, "leave out fast"),
        ({"tool": {"name": "get-modality"}, "ml": True, "task": "total"}, "leave out ml, task"),
        ({"tool": {"name": "get-phase", "normalized_intensities": True}}, "of get-modality only"),
        ({"tool": {"name": "get-age"}}, "tool.name"),
    ],
)
def test_a_tool_job_takes_no_segmentation_options(asked: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidOptionError, match=words):
        BatchConfig.load(None, {"input": "in", "output": "out", **asked})
