"""The weights store on S3: moto's S3 server on 127.0.0.1, reached through s3fs.

The endpoint is configured the standard way, with ``AWS_ENDPOINT_URL`` (honoured by
botocore >= 1.31 and therefore by s3fs), so raytseg needs no S3-specific setting.
"""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest

from raytseg.config import Settings
from raytseg.errors import MissingWeightsError
from raytseg.tasks.registry import get_task
from raytseg.weights.store import WeightsStore, dataset_folder_name
from raytseg.weights.synth import synthesize_task
from tests.integration.conftest import StoppableS3

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "raytseg-weights"
OUTAGE_S = 10.0  # longer than botocore retries on its own (about 8 s)
FAST = get_task("total").modes["fast"].models[0]  # 297


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    synthesize_task("total", root, fast=True, tiny=True)  # 297, 298
    synthesize_task("body", root, fast=True, tiny=True)  # 300
    return root


def settings(tmp_path: Path, uri: str) -> Settings:
    return Settings.from_env({"HOME": str(tmp_path / "home"), "RAYTSEG_WEIGHTS": uri})


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_store_fetches_only_the_needed_model_from_s3(tmp_path: Path, s3: Any, tiny_models: Path) -> None:
    prefix = f"{BUCKET}/{tmp_path.name}/results"
    s3.put(str(tiny_models) + "/", prefix, recursive=True)
    s3.invalidate_cache()
    assert len(s3.ls(prefix)) == 3
    uri = f"s3://{prefix}"
    store = WeightsStore(settings(tmp_path, uri))
    folder = store.model_folder(FAST)
    trainer = f"{dataset_folder_name(297)}/{FAST.trainer_folder}"
    assert folder == store.root / trainer
    assert store.root.is_relative_to(tmp_path / "home" / ".cache" / "raytseg" / "weights")
    expected = [f"{trainer}/{name}" for name in ("dataset.json", "fold_0/checkpoint_final.pth", "plans.json")]
    assert files_under(store.root) == expected
    assert (folder / "plans.json").read_bytes() == (tiny_models / trainer / "plans.json").read_bytes()
    assert store.checkpoint_paths(FAST) == [folder / "fold_0" / "checkpoint_final.pth"]
    with pytest.raises(MissingWeightsError, match=uri):
        store.model_folder(get_task("body").modes["default"].models[0])  # 299 is not uploaded
    assert files_under(store.root) == expected


def test_store_extracts_a_weights_zip_on_s3(tmp_path: Path, s3: Any, tiny_models: Path) -> None:
    archive = tmp_path / "weights.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tiny_models / dataset_folder_name(297)).rglob("*")):
            zf.write(path, path.relative_to(tiny_models).as_posix())
    key = f"{BUCKET}/{tmp_path.name}/weights.zip"
    s3.put_file(str(archive), key)
    store = WeightsStore(settings(tmp_path, f"s3://{key}"))
    assert store.model_folder(FAST).is_dir()
    assert [p.name for p in store.root.parent.iterdir()] == [store.root.name]


def test_a_replica_starting_during_a_storage_outage_gets_its_model_once_it_is_back(
    tmp_path: Path, s3: Any, tiny_models: Path, stoppable_s3: StoppableS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"{BUCKET}/{tmp_path.name}/results"
    s3.put(str(tiny_models) + "/", prefix, recursive=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", stoppable_s3.url)  # the same objects, a server we can stop
    s3fs.S3FileSystem.clear_instance_cache()
    stoppable_s3.stop()
    back = threading.Timer(OUTAGE_S, stoppable_s3.start)
    back.start()
    try:
        folder = WeightsStore(settings(tmp_path, f"s3://{prefix}")).model_folder(FAST)
    finally:
        back.join()
        s3fs.S3FileSystem.clear_instance_cache()
    trainer = tiny_models / dataset_folder_name(297) / FAST.trainer_folder
    for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        assert (folder / name).read_bytes() == (trainer / name).read_bytes()
