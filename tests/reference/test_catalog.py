"""The committed task catalogue is exactly what TotalSegmentator's own tables give."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from raytseg.tasks import load_catalog

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.reference


def test_catalog_matches_totalsegmentator_tables(ts_python: Path) -> None:
    generated = subprocess.run(
        [str(ts_python), str(REPO / "tools" / "generate_catalog.py")],
        cwd="/",  # keep the repo off sys.path: the generator must read the installed package
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (REPO / "raytseg" / "tasks" / "catalog.json").read_text()
    assert json.loads(generated) == json.loads(committed)


def test_every_readme_task_is_in_the_catalogue() -> None:
    readme_tasks = {
        "total", "total_mr", "lung_vessels", "body", "body_mr", "vertebrae_mr", "cerebral_bleed",
        "hip_implant", "coronary_arteries", "pleural_pericard_effusion", "head_glands_cavities",
        "head_muscles", "headneck_bones_vessels", "headneck_muscles", "liver_vessels",
        "oculomotor_muscles", "lung_nodules", "kidney_cysts", "breasts", "heartchambers_highres",
        "appendicular_bones", "appendicular_bones_mr", "tissue_types", "tissue_types_mr",
        "brain_structures", "vertebrae_body", "face", "face_mr", "thigh_shoulder_muscles",
        "thigh_shoulder_muscles_mr",
    }  # fmt: skip
    assert readme_tasks <= set(load_catalog().tasks)
