"""``raytseg segment`` accepts every flag of the reference ``TotalSegmentator`` CLI, spelled the same."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from raytseg.cli import _parser

pytestmark = pytest.mark.reference

# Builds TotalSegmentator's own parser (its main() does) and prints its option strings.
_THEIR_FLAGS = """
import argparse, json
from totalsegmentator.bin import TotalSegmentator

class Parsed(Exception):
    pass

def record(self, *args, **kwargs):
    print(json.dumps([s for action in self._actions for s in action.option_strings]))
    raise Parsed

argparse.ArgumentParser.parse_args = record
try:
    TotalSegmentator.main()
except Parsed:
    pass
"""


def test_every_totalsegmentator_flag_is_a_segment_flag(ts_python: Path) -> None:
    done = subprocess.run(
        [str(ts_python), "-c", _THEIR_FLAGS], cwd="/", capture_output=True, text=True, check=True, timeout=120
    )
    theirs = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert len(theirs) > 60  # the whole parser, not a fragment
    segment = _parser()._subparsers._group_actions[0].choices["segment"]  # type: ignore[union-attr]
    ours = {spelling for action in segment._actions for spelling in action.option_strings}
    assert sorted(theirs - ours) == []
