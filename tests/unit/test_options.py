"""Options are declared once (``SegmentOptions``, ``OutputOptions``) and derived everywhere."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import raytseg
from raytseg.errors import InvalidOptionError
from raytseg.options import add_flags, from_args, given_options, http_model, placed_files, split_options
from raytseg.pipeline.records import OutputOptions, SegmentOptions


def _parse(*argv: str, overrides_config: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, overrides_config=overrides_config)
    return parser.parse_args(list(argv))


def test_totalsegmentator_short_flags_give_the_records() -> None:
    args = _parse("-ta", "body", "-f", "-rs", "liver", "spleen", "-s", "-sa", "median", "-ml", "-ndm", "-p")
    options, output, places = from_args(args)
    assert places == {}
    assert options == SegmentOptions(
        task="body", fast=True, roi_subset=("liver", "spleen"), statistics=True, stats_aggregation="median"
    )
    assert output == OutputOptions(ml=True, derived_masks=False, preview=True)


def test_each_of_totalsegmentators_spellings_gives_the_option() -> None:
    for spelling in ("-ho", "--higher_order_resampling", "--high_order_resampling"):
        options, _, _ = from_args(_parse(spelling))
        assert options == SegmentOptions(higher_order_resampling=True), spelling


def test_flag_defaults_are_the_records_defaults() -> None:
    assert from_args(_parse()) == (SegmentOptions(), OutputOptions(), {})


def test_remove_small_blobs_alone_means_200_mm3() -> None:
    assert from_args(_parse("-rmb"))[0].remove_small_blobs == 200.0
    assert from_args(_parse("--remove_small_blobs", "50"))[0].remove_small_blobs == 50.0


def test_roi_subset_robust_is_a_subset_with_robust_crop() -> None:
    options, _, _ = from_args(_parse("-rsr", "liver"))
    assert (options.roi_subset, options.robust_crop) == (("liver",), True)


def test_s_path_turns_statistics_on_and_places_the_file_there() -> None:
    options, output, places = from_args(_parse("-s", "some/path.json", "-f"))
    assert (options.statistics, options.fast, output) == (True, True, OutputOptions())
    assert places == {"statistics.json": "some/path.json"}
    options, _, places = from_args(_parse("--statistics", "-f"))  # alone: into the output folder
    assert (options.statistics, places) == (True, {})
    assert from_args(_parse("-f"))[0].statistics is False


def test_sp_path_places_the_probabilities_and_their_properties_beside_them() -> None:
    options, _, places = from_args(_parse("-sp", "out/probs.npz"))
    assert options.save_probabilities is True
    assert places == {"probabilities.npz": "out/probs.npz", "probabilities.pkl": "out/probs.pkl"}
    _, _, places = from_args(_parse("-sp", "s3://bucket/p.v2"))  # the last suffix, as Path.with_suffix
    assert places["probabilities.pkl"] == "s3://bucket/p.pkl"


def test_placed_files_takes_a_path_for_true_and_leaves_bools_alone() -> None:
    assert placed_files({"statistics": True, "fast": True}) == ({"statistics": True, "fast": True}, {})
    assert placed_files({"statistics": False}) == ({"statistics": False}, {})
    values, places = placed_files({"statistics": Path("a/b.json"), "ml": True})
    assert (values, places) == ({"statistics": True, "ml": True}, {"statistics.json": "a/b.json"})


def test_a_statistics_path_is_refused_where_each_image_has_its_own_folder() -> None:
    from raytseg.batch.config import BatchConfig

    with pytest.raises(InvalidOptionError, match="statistics takes true or false here, not a path"):
        split_options({"statistics": "out/stats.json"})
    assert split_options({"statistics": "true"})[0].statistics  # a config file's spelling of true
    with pytest.raises(InvalidOptionError, match="not a path"):  # raytseg batch -s x.json
        BatchConfig.load(None, {"input": "in", "output": "out", "statistics": "x.json"})
    with pytest.raises(ValidationError, match="statistics"):  # the service's parameter is a bool
        http_model("Query").model_validate({"statistics": "out/stats.json"})


def test_over_a_config_only_given_flags_have_values() -> None:
    assert given_options(_parse(overrides_config=True)) == {}
    given = given_options(_parse("-f", "-ndm", overrides_config=True))
    assert given == {"fast": True, "derived_masks": False}


def test_invalid_values_name_the_option() -> None:
    with pytest.raises(InvalidOptionError, match="remove_small_blobs"):
        from_args(_parse("-rmb", "-5"))


def test_python_api_keywords_are_checked() -> None:
    options, output = split_options({"task": "body", "fast": True, "ml": True})
    assert (options.task, options.fast, output.ml) == ("body", True, True)
    with pytest.raises(InvalidOptionError, match="fsat"):
        split_options({"fsat": True})


def test_http_options_split_commas_and_default_to_one_nifti() -> None:
    query = http_model("Query")
    request = query.model_validate({"roi_subset": ["liver,spleen", " kidney_left "], "task": "total"})
    assert request.segment().roi_subset == ("liver", "spleen", "kidney_left")
    assert request.output() == OutputOptions(ml=True)
    assert request.task_name == "total"
    with pytest.raises(ValueError, match="fsat"):
        query.model_validate({"fsat": True})


def test_job_options_take_the_task_from_the_request() -> None:
    options = http_model("Job", exclude=frozenset({"task"}))
    assert "task" not in options.model_fields
    request = options.model_validate({"fast": True})
    assert request.segment(task="body") == SegmentOptions(task="body", fast=True)


# An option added to SegmentOptions, with nothing else edited: the run below finds it in
# `raytseg segment`, `raytseg batch` (flag and YAML key), the HTTP query, the job body
# and the OpenAPI document of the real service.
PROBE = """
import json, sys
from pathlib import Path
from raytseg.cli import _parser
from raytseg.options import from_args
from raytseg.batch.cli import config_from_args
from raytseg.batch.config import BatchConfig
from raytseg.serve.schemas import JobRequest, SegmentQuery
from raytseg.serve.ingress import api

config = Path(sys.argv[1]); config.write_text("input: a\\noutput: b\\nnew_knob: true\\n")
spec = api.openapi()
found = {
    "cli": from_args(_parser().parse_args(["segment", "-i", "x", "-o", "y", "-nk"]))[0].new_knob,
    "batch_flag": config_from_args(
        _parser().parse_args(["batch", "--input", "a", "--output", "b", "--new_knob"])
    ).segment_options().new_knob,
    "batch_yaml": BatchConfig.load(config, {}).segment_options().new_knob,
    "http": SegmentQuery.model_validate({"new_knob": "true"}).segment().new_knob,
    "job": JobRequest.model_validate(
        {"input_uri": "a", "output_uri": "b", "options": {"new_knob": True}}
    ).options.segment(task="total").new_knob,
    "openapi": "new_knob" in [p["name"] for p in spec["paths"]["/v1/segment"]["post"]["parameters"]],
    "copy": __import__("raytseg").__file__.startswith(str(config.parent)),
    "help": "-nk" in _parser()._subparsers._group_actions[0].choices["segment"].format_help(),
}
print(json.dumps(found))
"""

NEW_FIELD = """
    new_knob: Annotated[bool, Flag("-nk")] = Field(default=False, description="A knob a test added.")
"""


def test_an_option_added_to_segment_options_reaches_every_entry_point(tmp_path: Path) -> None:
    package = tmp_path / "raytseg"
    shutil.copytree(Path(raytseg.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    records = package / "pipeline" / "records.py"
    text = records.read_text()
    anchor = "class OutputOptions(BaseModel):"
    assert anchor in text
    records.write_text(text.replace(anchor, NEW_FIELD.lstrip("\n") + "\n\n" + anchor, 1))
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "job.yaml")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(found) == 8
    assert found == dict.fromkeys(found, True)
