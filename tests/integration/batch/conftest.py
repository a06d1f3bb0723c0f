"""Fixtures for the batch job tests: a real S3 protocol server, tiny weights, one local Ray.

- moto's S3 server (``tests/integration/conftest.py``) in every job's environment;
- tiny synthetic weights for the fast ``total`` models (3 mm, and the 6 mm crop model)
  and the fast ``body`` model;
- the inputs: example CTs, a DICOM zip, a DICOM folder, a corrupt and a truncated file;
- ``raytseg segment`` outputs of the same inputs, the reference the job must match byte
  for byte;
- one small Ray per module (2 CPUs, 300 MB object store), started after the environment
  is set so its workers inherit it.

Helpers reach tests as fixtures (pytest runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from raytseg.batch.commit import MARKER_NAME

pytest.importorskip("ray.data")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "raytseg-batch"
REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "totalseg-reference"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)  # 297 (3 mm) and 298 (6 mm, crop passes)
    synthesize_task("body", root, fast=True, tiny=True)  # 300
    return root


@pytest.fixture(scope="module")
def batch_env(
    s3_client_env: Callable[[Path], dict[str, str]],
    tiny_weights: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """The environment of every job (also of the subprocess jobs): S3 endpoint, weights."""
    home = tmp_path_factory.mktemp("home")
    env = {
        **s3_client_env(home),
        # Not HOME: Ray keeps its auth token there, and a process must keep finding it.
        "TOTALSEG_HOME_DIR": str(home / "totalseg"),
        "RAYTSEG_CACHE_DIR": str(home / "cache"),
        "RAYTSEG_WEIGHTS": str(tiny_weights),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)  # never join someone else's cluster
        yield env


@pytest.fixture(scope="module")
def s3(batch_env: dict[str, str], s3_bucket: Callable[[str], AbstractContextManager[Any]]) -> Iterator[Any]:
    with s3_bucket(BUCKET) as fs:
        yield fs


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NIfTI CT and MR images (one CT twice), a DICOM zip and folder, a corrupt and a truncated file."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copy(REFERENCE / "example_ct_sm.nii.gz", root / "ct_small.nii.gz")
    shutil.copy(REFERENCE / "example_mr_sm.nii.gz", root / "mr_small.nii.gz")
    shutil.copy(REFERENCE / "example_ct_sm.nii.gz", root / "ct_again.nii.gz")
    with zipfile.ZipFile(root / "dicom_series.zip", "w") as archive:
        for path in sorted((REFERENCE / "example_ct_dicom").iterdir()):
            archive.write(path, path.name)
    shutil.copytree(REFERENCE / "example_ct_dicom", root / "patient7" / "series")
    (root / "corrupt.nii.gz").write_bytes(b"this is not an image\n" * 10)
    whole = (REFERENCE / "example_ct_sm.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(whole[: len(whole) // 3])
    (root / "README.txt").write_text("not an input\n")
    return root


@pytest.fixture(scope="session")
def reference_outputs(
    inputs: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """``raytseg segment -i <input> -o <folder> <flags>``, run once per (input, flags) and session."""
    from raytseg.cli import main

    root = tmp_path_factory.mktemp("reference")
    cache: dict[tuple[str, ...], Path] = {}

    def run(name: str, *flags: str, ml: bool = False) -> Path:
        key = (name, *flags, str(ml))
        if key not in cache:
            folder = root / f"ref{len(cache)}"
            target = folder / "segmentation.nii.gz" if ml else folder
            args = ["segment", "-i", str(inputs / name), "-o", str(target), "-d", "cpu", "-q", *flags]
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("RAYTSEG_WEIGHTS", str(tiny_weights))
                patch.setenv("TOTALSEG_HOME_DIR", str(root / "totalseg"))
                assert main([*args, "--ml"] if ml else args) == 0
            cache[key] = folder
        return cache[key]

    return run


@pytest.fixture(scope="module")
def local_ray(batch_env: dict[str, str]) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        pytest.skip("Another test left Ray running in this process")
    ray.init(
        address="local",  # our own, even when another cluster runs on this machine
        num_cpus=2,
        object_store_memory=300 * 1024**2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def s3_prefix(s3: Any, request: pytest.FixtureRequest) -> str:
    """A fresh prefix in the bucket for one test."""
    return f"{BUCKET}/{request.node.name}"


@pytest.fixture
def upload(s3: Any, inputs: Path) -> Callable[..., str]:
    """Copy some inputs (file or folder names) under ``prefix``; returns its s3:// URI."""

    def put(prefix: str, *names: str) -> str:
        for name in names:
            source = inputs / name
            if source.is_dir():
                s3.put(str(source) + "/", f"{prefix}/{name}", recursive=True)
            else:
                s3.put_file(str(source), f"{prefix}/{name}")
        s3.invalidate_cache()
        return f"s3://{prefix}"

    return put


@pytest.fixture
def s3_files(s3: Any) -> Callable[[str], dict[str, bytes]]:
    """``{path relative to prefix: bytes}`` of every object under an s3:// prefix."""

    def read(uri: str) -> dict[str, bytes]:
        prefix = uri.removeprefix("s3://").rstrip("/")
        s3.invalidate_cache()
        paths = s3.find(prefix)
        return {p[len(prefix) + 1 :]: s3.cat_file(p) for p in paths}

    return read


@pytest.fixture
def local_files() -> Callable[[Path], dict[str, bytes]]:
    def read(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    return read


@pytest.fixture(scope="session")
def item_files() -> Callable[[dict[str, bytes], str], dict[str, bytes]]:
    """``item_files(written, folder)``: the files of one item folder of ``s3_files``'s answer
    (relative names), without its completion marker, which must be there and not empty."""

    def files_of(written: dict[str, bytes], folder: str) -> dict[str, bytes]:
        prefix = folder.rstrip("/") + "/"
        files = {name[len(prefix) :]: data for name, data in written.items() if name.startswith(prefix)}
        assert files.pop(MARKER_NAME, b""), f"{folder} is not marked complete"
        return files

    return files_of
