"""``-r/--radiomics`` against TotalSegmentator 2.18: its ``statistics_radiomics.json``, byte for
byte, both with pyradiomics-bhklab 3.1.4 (the ``radiomics`` module TotalSegmentator imports).

- Real masks: TotalSegmentator's own ``--fast`` output of the reference CT (117 class files,
  most of them empty) through ``raytseg stats --radiomics`` and through TotalSegmentator's
  ``get_radiomics_features_for_entire_dir``.
- A whole run is not repeated here (it cost CI 80 s): ``segment -r`` computes the same
  function on the very class files it writes (tests/unit/pipeline/test_radiomics.py), and
  those files equal TotalSegmentator's (test_parity.py). Measured once by hand: a
  ``--fast -r`` run of both tools on the same synthetic weights gave identical files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from raytseg.cli import main
from raytseg.pipeline.radiomics import standard_features

pytestmark = pytest.mark.reference

TS_DIR_FEATURES = """
import sys
from pathlib import Path
from totalsegmentator.statistics import get_radiomics_features_for_entire_dir
get_radiomics_features_for_entire_dir(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
"""


def test_radiomics_of_totalsegmentators_real_masks(
    ts_python: Path, reference_data: Path, tmp_path: Path
) -> None:
    image, masks = reference_data / "example_ct_sm.nii.gz", reference_data / "example_seg_fast"
    theirs = tmp_path / "theirs.json"
    args = [str(ts_python), "-c", TS_DIR_FEATURES, str(image), str(masks), str(theirs)]
    done = subprocess.run(args, cwd="/", capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = tmp_path / "ours.json"
    assert main(["stats", "-i", str(image), "--seg", str(masks), "--radiomics", str(ours)]) == 0
    assert ours.read_bytes() == theirs.read_bytes()
    features = json.loads(ours.read_text())
    assert len(features) == 117
    measured = [name for name, values in features.items() if any(values.values())]
    assert len(measured) >= 20  # real structures, not only the zeros of empty masks
    empty = next(values for values in features.values() if not any(values.values()))
    assert tuple(empty) == standard_features()
