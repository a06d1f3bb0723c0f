"""Fixtures shared by every test folder: the reference implementation and its example data.

The reference implementation is the TotalSegmentator 2.18 package in its own virtual
environment (``.venv-ref``, made by ``scripts/setup-reference-env.sh``); ``RAYTSEG_REF_PYTHON``
points elsewhere. Tests that need it skip without it, unless ``RAYTSEG_REQUIRE_REFERENCE=1``
(set by ``.ci/run``), which turns the skip into a failure so CI cannot pass vacuously.

pytest runs with ``--import-mode=importlib``, so tests cannot import this module: they take
these as fixture arguments.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DATA = REPO.parent / "shared" / "data" / "totalseg-reference"


@pytest.fixture(scope="session")
def ts_python() -> Path:
    """A Python that imports TotalSegmentator, or skip (fail under RAYTSEG_REQUIRE_REFERENCE=1)."""
    python = Path(os.environ.get("RAYTSEG_REF_PYTHON", REPO / ".venv-ref" / "bin" / "python"))
    if python.exists():
        # cwd="/" keeps the repository off sys.path: the probe must find the installed package.
        probe = subprocess.run(
            [str(python), "-c", "import totalsegmentator"], cwd="/", capture_output=True, check=False
        )
        if probe.returncode == 0:
            return python
    message = (
        f"No Python with TotalSegmentator installed at {python}: "
        "run scripts/setup-reference-env.sh (or set RAYTSEG_REF_PYTHON)"
    )
    if os.environ.get("RAYTSEG_REQUIRE_REFERENCE") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """TotalSegmentator's example images and outputs, shared beside the repository."""
    if not REFERENCE_DATA.exists():
        pytest.fail(f"Reference data not found at {REFERENCE_DATA}")
    return REFERENCE_DATA
