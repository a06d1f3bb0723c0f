"""``raytseg get-phase`` against TotalSegmentator 2.18's ``totalseg_get_phase``: the same
JSON file, byte for byte, on the same synthetic weights (``total --fast`` and
``headneck_bones_vessels``; random weights segment the brain, so both models run)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["example_ct_sm", "example_ct"])
def test_get_phase_answers_as_totalsegmentator(
    name: str,
    ts_script: Callable[..., bytes],
    raytseg_tool: Callable[..., bytes],
    reference_data: Path,
    tmp_path: Path,
) -> None:
    image = reference_data / f"{name}.nii.gz"
    theirs = ts_script("totalseg_get_phase", image, tmp_path / "ts.json")
    ours = raytseg_tool("get-phase", image, tmp_path / "raytseg.json")
    assert ours == theirs
    keys = {"pi_time", "phase", "probability", "pi_time_min", "pi_time_max", "stddev"}
    assert set(json.loads(ours)) == keys
