"""Fixtures shared by every test folder: the reference implementation and its example data,
``tools/chart.py``, a poll-until helper, and the ``extended`` cases left out of CI unless
``RAYTSEG_EXTENDED_TESTS=1``.

The reference implementation is the TotalSegmentator 2.18 package in its own virtual
environment (``.venv-ref``, made by ``scripts/setup-reference-env.sh``); ``RAYTSEG_REF_PYTHON``
points elsewhere. Tests that need it skip without it, unless ``RAYTSEG_REQUIRE_REFERENCE=1``
(set by ``.ci/run``), which turns the skip into a failure so CI cannot pass vacuously.

pytest runs with ``--import-mode=importlib``, so tests cannot import this module: they take
these as fixture arguments.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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


@pytest.fixture(scope="session")
def chart_tools() -> ModuleType:
    """``tools/chart.py`` as a module (tools/ is not a package)."""
    name = "raytseg_chart_tools"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "chart.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def missing_deploy_tool(what: str) -> None:
    """Skip, or fail under ``RAYTSEG_REQUIRE_DEPLOY_TOOLS=1`` (scripts/test.sh), so CI cannot
    pass the deployment tests vacuously."""
    if os.environ.get("RAYTSEG_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"{what} (run scripts/setup-ci-tools.sh)")
    pytest.skip(f"{what}: run scripts/setup-ci-tools.sh")


@pytest.fixture(scope="session")
def chart(chart_tools: ModuleType) -> ModuleType:
    """``tools/chart.py``, once a helm binary is there (scripts/setup-ci-tools.sh, or $HELM)."""
    binary = chart_tools.helm_binary()
    if not (Path(binary).exists() or shutil.which(binary)):
        missing_deploy_tool(f"No helm binary at {binary}")
    return chart_tools


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        missing_deploy_tool("No prometheus binary")
    return str(found)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="session")
def waiter() -> Callable[..., None]:
    """``waiter(check, timeout_s, what, every_s=0.5)``: poll until ``check()`` or fail."""
    return wait_until


# Cases marked ``extended`` (slow variants of what CI already covers, each passed when it
# left CI) run only when this is 1, to keep CI within its time budget.
EXTENDED_TESTS = "RAYTSEG_EXTENDED_TESTS"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(EXTENDED_TESTS) == "1":
        return
    skip = pytest.mark.skip(reason=f"extended: left out of CI for time; run with {EXTENDED_TESTS}=1")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


_FINISHED_SESSION = pytest.StashKey[pytest.Session]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail a run that leaves this process connected to a Ray it started: some fixture did
    not stop what it started. Ray is shut down here, while every module is still loaded,
    instead of by its atexit hook in the middle of interpreter teardown."""
    session.config.stash[_FINISHED_SESSION] = session
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return
    ray.shutdown()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        reporter.write_line("ERROR: the tests left Ray running in the pytest process", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with pytest's exit status once every report is written.

    A CI run segfaulted (exit 139) after its summary, "874 passed", during interpreter
    teardown: native libraries (torch's and xgboost's two OpenMP runtimes, Ray, grpc) are
    finalised in no defined order there, and no subset of the suite reproduced it. The
    product's own processes are tested to exit cleanly (the CLI in subprocesses, Ray workers);
    this process's teardown proves nothing, so it is skipped. PYTHONFAULTHANDLER
    (scripts/test.sh) prints the stack of any crash before this point.
    """
    session = config.stash.get(_FINISHED_SESSION, None)
    if session is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
