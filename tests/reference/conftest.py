"""Fixtures that run the reference implementation: the TotalSegmentator 2.18 package.

TotalSegmentator lives in its own virtual environment (``.venv-ref``, made by
``scripts/setup-reference-env.sh``) because it needs torchvision, which the CPU torch
build raytseg uses cannot load. Both tools get the same synthetic weights folder: raytseg
through ``RAYTSEG_WEIGHTS``, TotalSegmentator through ``TOTALSEG_HOME_DIR`` — the
official layout, unchanged.

``ts_python`` and ``reference_data`` come from ``tests/conftest.py``: without the reference
environment these tests skip, unless ``RAYTSEG_REQUIRE_REFERENCE=1`` (set by ``.ci/run``),
which turns the skip into a failure so CI cannot pass vacuously.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight models for every task the parity tests run."""
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    for task, modes in {
        "total": ("default", "fast"),
        "total_mr": ("default", "fast"),
        "body": ("default", "fast"),
        "headneck_bones_vessels": ("default",),  # get-phase
        "vertebrae_pp_refined": ("default",),  # with the vertebrae_body model
    }.items():
        for mode in modes:
            synthesize_task(task, root, fast=mode == "fast", tiny=True)
    synthesize_task("total_v3", root, tiny=True, with_crop_models=False, small=True)  # -ms small
    return root


@pytest.fixture(scope="session")
def ts_home(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """A TotalSegmentator home whose nnunet/results is the shared weights folder."""
    home = tmp_path_factory.mktemp("totalseg_home")
    (home / "nnunet").mkdir()
    (home / "nnunet" / "results").symlink_to(tiny_weights, target_is_directory=True)
    config = {
        "totalseg_id": "totalseg_raytsegci",
        "send_usage_stats": False,  # nothing may leave 127.0.0.1
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    (home / "config.json").write_text(json.dumps(config))
    return home


class TotalSegmentatorRunner:
    """Runs the ``TotalSegmentator`` CLI of the reference env, caching outputs per argument list."""

    def __init__(self, python: Path, home: Path, workdir: Path) -> None:
        self.python, self.home, self.workdir = python, home, workdir
        self._cache: dict[tuple[str, ...], Path] = {}

    def run(self, input_path: Path, *flags: str, ml: bool = False) -> Path:
        key = (str(input_path), *flags, str(ml))
        if key not in self._cache:
            out_dir = self.workdir / f"ts_{len(self._cache)}"
            out = out_dir / "seg.nii.gz" if ml else out_dir
            cli = self.python.parent / "TotalSegmentator"
            args = [str(cli), "-i", str(input_path), "-o", str(out), "-d", "cpu", "-q", *flags]
            if ml:
                args.append("--ml")
            env = {**os.environ, "TOTALSEG_HOME_DIR": str(self.home)}
            env.pop("TOTALSEG_WEIGHTS_PATH", None)
            done = subprocess.run(
                args, env=env, cwd=self.workdir, capture_output=True, text=True, timeout=900
            )
            if done.returncode != 0:
                raise AssertionError(
                    f"TotalSegmentator failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
            self._cache[key] = out
        return self._cache[key]


@pytest.fixture(scope="session")
def totalsegmentator(
    ts_python: Path, ts_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TotalSegmentatorRunner]:
    workdir = tmp_path_factory.mktemp("ts_runs")
    yield TotalSegmentatorRunner(ts_python, ts_home, workdir)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def ts_script(ts_python: Path, ts_home: Path) -> Callable[..., bytes]:
    """``ts_script(name, image, out, *flags)``: run one of TotalSegmentator's tools (e.g.
    ``totalseg_get_phase``) on the CPU with the shared weights; the bytes of ``out``."""

    def run(name: str, image: Path, out: Path, *flags: str) -> bytes:
        env = {**os.environ, "TOTALSEG_HOME_DIR": str(ts_home)}
        env.pop("TOTALSEG_WEIGHTS_PATH", None)
        args = [str(ts_python.parent / name), "-i", str(image), "-o", str(out), "-q", "-d", "cpu", *flags]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return out.read_bytes()

    return run


@pytest.fixture
def raytseg_tool(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., bytes]:
    """``raytseg_tool(command, image, out, *flags)``: ``raytseg <command>`` on the CPU with
    the shared weights; the bytes of ``out``."""
    from raytseg.cli import main

    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "raytseg-home"))

    def run(command: str, image: Path, out: Path, *flags: str) -> bytes:
        assert main([command, "-i", str(image), "-o", str(out), "-q", "-d", "cpu", *flags]) == 0
        return out.read_bytes()

    return run
