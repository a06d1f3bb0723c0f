"""The contrast-phase regressors (TotalSegmentator's pickle, read by an allow-listing
unpickler) and the pi time -> phase mapping."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from raytseg.cli import main
from raytseg.errors import MissingResourceError
from raytseg.pipeline import phase

pytest.importorskip("xgboost")
REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "totalseg-reference"

# totalseg_get_phase.py's pi_time_to_phase, written out: (pi time, phase, probability).
TOTALSEGMENTATOR_TABLE = [
    (0, "native", 1.0), (4.99, "native", 1.0), (5, "native", 0.7), (9.99, "native", 0.7),
    (10, "arterial_early", 0.7), (19.99, "arterial_early", 0.7), (20, "arterial_early", 1.0),
    (30, "arterial_late", 1.0), (49.99, "arterial_late", 1.0), (50, "arterial_late", 0.7),
    (60, "portal_venous", 1.0), (69.99, "portal_venous", 1.0), (70, "portal_venous", 1.0),
    (89.99, "portal_venous", 1.0), (90, "portal_venous", 0.7), (99.99, "portal_venous", 0.7),
    (100, "portal_venous", 0.3), (400, "portal_venous", 0.3),
]  # fmt: skip


@pytest.mark.parametrize(("pi_time", "name", "probability"), TOTALSEGMENTATOR_TABLE)
def test_pi_time_to_phase_is_totalsegmentators(pi_time: float, name: str, probability: float) -> None:
    assert phase.pi_time_to_phase(pi_time) == (name, probability)


def test_features_give_a_plausible_phase() -> None:
    native = phase.predict([0.0] * 20)
    assert native.phase == "native"
    assert native.pi_time_min <= native.pi_time <= native.pi_time_max
    enhanced = [150, 100, 20, 30, 200, 250, 180, 160, 150, 150, 250, 250, 200, 30, 40, 80]
    assert phase.predict([float(v) for v in enhanced] + [250.0, 250.0, 180.0, 180.0]).pi_time > 30


class _Payload:
    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (Path("/tmp/raytseg-pickle-ran"),))


def test_a_classifier_file_with_other_types_is_refused_unexecuted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = Path("/tmp/raytseg-pickle-ran")
    marker.unlink(missing_ok=True)
    (tmp_path / phase.CLASSIFIERS).write_bytes(pickle.dumps({0: _Payload()}))
    monkeypatch.setenv("RAYTSEG_TS_RESOURCES", str(tmp_path))
    phase._regressors.cache_clear()
    try:
        with pytest.raises(MissingResourceError, match="pathlib.*is not allowed"):
            phase.predict([0.0] * 20)
    finally:
        phase._regressors.cache_clear()
    assert not marker.exists()


def test_get_phase_reuses_existing_statistics_without_a_head(tmp_path: Path) -> None:
    stats = {organ: {"volume": 1000.0, "intensity": 40.0} for organ in phase.ORGANS}
    stats["brain"]["volume"] = 0.0  # no head: the neck model is not needed (and absent here)
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    out = tmp_path / "phase.json"
    args = ["get-phase", "-i", str(REFERENCE / "example_ct_sm.nii.gz"), "-o", str(out), "-q"]
    assert main([*args, "-s", str(tmp_path / "stats.json")]) == 0
    expected = phase.predict([40.0] * 16 + [0.0] * 4)
    assert out.read_bytes() == expected.to_json()
