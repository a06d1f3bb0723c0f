"""``raytseg get-modality`` against TotalSegmentator 2.18's ``totalseg_get_modality``: the
same JSON file, byte for byte, on the reference images (intensity classifier), and with
``-n`` (the ROI classifier on ``total_mr --fast``) on the same synthetic weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

Tool = Callable[..., bytes]


@pytest.mark.parametrize("name", ["example_ct_sm", "example_ct", "example_mr_sm"])
def test_the_intensity_classifier_answers_as_totalsegmentator(
    name: str, ts_script: Tool, raytseg_tool: Tool, reference_data: Path, tmp_path: Path
) -> None:
    image = reference_data / f"{name}.nii.gz"
    theirs = ts_script("totalseg_get_modality", image, tmp_path / "ts.json")
    ours = raytseg_tool("get-modality", image, tmp_path / "raytseg.json")
    assert ours == theirs
    # What TotalSegmentator's classifier says of these images, the MR included (its minimum is -47).
    assert json.loads(ours) == {"modality": "ct", "probability": 1.0}


@pytest.mark.parametrize("name", ["example_ct_sm", "example_mr_sm"])
def test_the_roi_classifier_answers_as_totalsegmentator(
    name: str, ts_script: Tool, raytseg_tool: Tool, reference_data: Path, tmp_path: Path
) -> None:
    image = reference_data / f"{name}.nii.gz"
    theirs = ts_script("totalseg_get_modality", image, tmp_path / "ts.json", "-n")
    ours = raytseg_tool("get-modality", image, tmp_path / "raytseg.json", "-n")
    assert ours == theirs
