from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raytseg.config import Settings
from raytseg.errors import InvalidOptionError, MissingWeightsError, WeightsIntegrityError
from raytseg.tasks.registry import ModelSpec, get_task
from raytseg.weights.license import LICENSE_URL
from raytseg.weights.store import WeightsStore, dataset_folder_name, datasets_for_task

CopyModels = Callable[[Path, list[str]], Path]
MakeSettings = Callable[..., Settings]
TOTAL_3MM = dataset_folder_name(297)
TOTAL_6MM = dataset_folder_name(298)
ORGANS = dataset_folder_name(291)


def model(task: str, mode: str = "default", index: int = 0) -> ModelSpec:
    return get_task(task).modes[mode].models[index]


FAST = model("total", "fast")  # 297, fold 0


# --- where the store root is ---------------------------------------------------------------


def test_root_follows_totalsegmentator_env(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path / "h")}
    default = tmp_path / "h" / ".totalsegmentator" / "nnunet" / "results"
    assert WeightsStore(Settings.from_env(home)).root == default
    ts_home = home | {"TOTALSEG_HOME_DIR": str(tmp_path / "ts")}
    assert WeightsStore(Settings.from_env(ts_home)).root == tmp_path / "ts" / "nnunet" / "results"
    path = ts_home | {"TOTALSEG_WEIGHTS_PATH": str(tmp_path / "w")}
    assert WeightsStore(Settings.from_env(path)).root == tmp_path / "w"
    ours = path | {"RAYTSEG_WEIGHTS": str(tmp_path / "r")}
    assert WeightsStore(Settings.from_env(ours)).root == tmp_path / "r"


def test_root_for_a_uri_is_a_cache_folder_per_uri(tmp_path: Path, settings_for: MakeSettings) -> None:
    uri = "s3://bucket/weights"
    store = WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=uri))
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    assert store.root == tmp_path / "cache" / "weights" / digest
    assert store.uri == uri


# --- resolving a model ---------------------------------------------------------------------


def test_model_folder_checkpoints_and_plans(
    tmp_path: Path, copy_models: CopyModels, settings_for: MakeSettings
) -> None:
    settings = settings_for(tmp_path)
    copy_models(settings.weights_dir, [TOTAL_3MM])
    store = WeightsStore(settings)
    folder = store.model_folder(FAST)
    assert folder == settings.weights_dir / TOTAL_3MM / FAST.trainer_folder
    assert store.checkpoint_paths(FAST) == [(folder / "fold_0" / "checkpoint_final.pth").resolve()]
    plans, dataset_json = store.read_plans(FAST)
    assert plans["dataset_name"] == TOTAL_3MM
    assert len(dataset_json["labels"]) == 118


def test_folds_none_finds_every_fold_with_a_checkpoint(
    tmp_path: Path, copy_models: CopyModels, settings_for: MakeSettings
) -> None:
    store = WeightsStore(settings_for(tmp_path))
    copy_models(store.root, [TOTAL_3MM])
    folder = store.root / TOTAL_3MM / FAST.trainer_folder
    for fold in ("fold_2", "fold_10", "fold_all"):
        (folder / fold).mkdir()
        shutil.copy(folder / "fold_0" / "checkpoint_final.pth", folder / fold / "checkpoint_final.pth")
    (folder / "fold_3").mkdir()  # no checkpoint: not a fold
    spec = FAST.model_copy(update={"folds": None})
    folds = [p.parent.name for p in store.checkpoint_paths(spec)]
    assert folds == ["fold_0", "fold_2", "fold_10", "fold_all"]


def test_missing_public_folder_names_it_and_the_commands(tmp_path: Path, settings_for: MakeSettings) -> None:
    store = WeightsStore(settings_for(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        store.model_folder(FAST)
    message = str(info.value)
    assert f"{TOTAL_3MM}/{FAST.trainer_folder}" in message
    assert str(store.root) in message
    # The fix names the mode too: 297 is total's --fast model.
    assert "raytseg weights download -t total --fast" in message
    assert f"raytseg weights synth -t total --fast -o {store.root}" in message


def test_missing_licensed_folder_says_how_to_get_a_license(
    tmp_path: Path, settings_for: MakeSettings
) -> None:
    store = WeightsStore(settings_for(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        store.model_folder(model("appendicular_bones"))
    message = str(info.value)
    assert "Dataset304_appendicular_bones_ext_1559subj" in message
    assert LICENSE_URL in message
    assert "raytseg set-license -l aca_" in message
    assert "raytseg weights download -t appendicular_bones" in message


def test_missing_unpublished_folder_says_it_cannot_be_downloaded(
    tmp_path: Path, settings_for: MakeSettings
) -> None:
    store = WeightsStore(settings_for(tmp_path))
    with pytest.raises(MissingWeightsError, match="does not publish dataset 957"):
        store.model_folder(model("total_highres_test"))


def test_missing_fold_and_plans_are_listed(
    tmp_path: Path, copy_models: CopyModels, settings_for: MakeSettings
) -> None:
    store = WeightsStore(settings_for(tmp_path))
    copy_models(store.root, [TOTAL_3MM])
    folder = store.root / TOTAL_3MM / FAST.trainer_folder
    (folder / "plans.json").unlink()
    with pytest.raises(MissingWeightsError) as info:
        store.model_folder(FAST.model_copy(update={"folds": [0, 1]}))
    assert "plans.json" in str(info.value)
    assert "fold_1/checkpoint_final.pth" in str(info.value)
    assert "fold_0/" not in str(info.value)


def test_two_folders_with_one_id_are_an_error(
    tmp_path: Path, copy_models: CopyModels, settings_for: MakeSettings
) -> None:
    store = WeightsStore(settings_for(tmp_path))
    copy_models(store.root, [TOTAL_3MM])
    os.rename(store.root / TOTAL_3MM, store.root / f"{TOTAL_3MM}_v204")
    copy_models(store.root, [TOTAL_3MM])
    with pytest.raises(WeightsIntegrityError) as info:
        store.model_folder(FAST)
    assert f"{TOTAL_3MM}_v204" in str(info.value)
    assert f"{TOTAL_3MM}," in str(info.value)


def test_checkpoint_linked_from_outside_the_root_is_refused(
    tmp_path: Path, copy_models: CopyModels, settings_for: MakeSettings
) -> None:
    store = WeightsStore(settings_for(tmp_path))
    copy_models(store.root, [TOTAL_3MM])
    checkpoint = store.root / TOTAL_3MM / FAST.trainer_folder / "fold_0" / "checkpoint_final.pth"
    outside = tmp_path / "elsewhere.pth"
    os.rename(checkpoint, outside)
    checkpoint.symlink_to(outside)
    with pytest.raises(WeightsIntegrityError, match="outside the weights folder"):
        store.checkpoint_paths(FAST)


def test_links_inside_the_root_and_a_linked_root_are_fine(
    tmp_path: Path, copy_models: CopyModels, settings_for: MakeSettings
) -> None:
    real = copy_models(tmp_path / "real", [TOTAL_3MM])
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    store = WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=str(tmp_path / "linked")))
    folder = real / TOTAL_3MM / FAST.trainer_folder
    os.rename(folder / "fold_0", real / "kept_fold_0")
    (folder / "fold_0").symlink_to(real / "kept_fold_0", target_is_directory=True)
    assert store.checkpoint_paths(FAST) == [real / "kept_fold_0" / "checkpoint_final.pth"]


# --- task -> datasets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "kwargs", "expected"),
    [
        ("total", {}, [291, 292, 293, 294, 295, 298, 297]),
        ("total", {"with_crop_models": False}, [291, 292, 293, 294, 295]),
        ("total", {"fast": True}, [297, 298]),
        ("total", {"fastest": True}, [298, 297]),
        ("total_mr", {}, [850, 851, 852]),
        ("total_mr", {"fastest": True}, [853, 852]),
        ("body", {}, [299]),
        ("lung_vessels", {}, [117, 298, 297]),
        ("abdominal_muscles", {}, [952, 300]),
        ("liver_segments_mr", {}, [576, 852]),
        ("teeth", {}, [113, 115, 298, 297]),
        ("vertebrae_pp_refined", {}, [803, 305]),
        ("appendicular_bones", {}, [304]),
    ],
)
def test_datasets_for_task(task: str, kwargs: dict[str, bool], expected: list[int]) -> None:
    assert datasets_for_task(task, **kwargs) == expected


def test_datasets_for_task_refuses_fast_for_single_resolution_tasks() -> None:
    with pytest.raises(InvalidOptionError):
        datasets_for_task("cerebral_bleed", fast=True)


def test_importing_store_fetch_and_license_does_not_import_torch() -> None:
    code = (
        "import sys, raytseg.weights.store, raytseg.weights.fetch, raytseg.weights.license; "
        "assert 'torch' not in sys.modules and 'nnunetv2' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


# --- remote weights (memory:// prefix, https zip) --------------------------------------------


def _upload(local_root: Path, uri: str, names: list[str]) -> None:
    import fsspec

    fs, base = fsspec.core.url_to_fs(uri)
    for name in names:
        for path in (local_root / name).rglob("*"):
            if path.is_file():
                fs.pipe_file(f"{base}/{path.relative_to(local_root).as_posix()}", path.read_bytes())


def test_prefix_uri_copies_only_the_needed_model(
    tmp_path: Path, tiny_root: Path, settings_for: MakeSettings
) -> None:
    uri = f"memory://raytseg-tests/{tmp_path.name}/weights"
    _upload(tiny_root, uri, [TOTAL_3MM, TOTAL_6MM, ORGANS])
    store = WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=uri))
    folder = store.model_folder(FAST)
    assert folder == store.root / TOTAL_3MM / FAST.trainer_folder
    copied = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    trainer = f"{TOTAL_3MM}/{FAST.trainer_folder}"
    needed = ("dataset.json", "fold_0/checkpoint_final.pth", "plans.json")
    assert copied == [f"{trainer}/{name}" for name in needed]
    assert (folder / "plans.json").read_bytes() == (tiny_root / trainer / "plans.json").read_bytes()
    # A second store on the same URI uses the cache; a missing remote model names the URI.
    assert WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=uri)).model_folder(FAST) == folder
    with pytest.raises(MissingWeightsError, match=uri):
        store.model_folder(model("body"))


def test_prefix_uri_adds_a_missing_fold_to_a_cached_model(
    tmp_path: Path, tiny_root: Path, settings_for: MakeSettings
) -> None:
    uri = f"memory://raytseg-tests/{tmp_path.name}/weights"
    _upload(tiny_root, uri, [TOTAL_3MM])
    import fsspec

    fs, base = fsspec.core.url_to_fs(uri)
    trainer = f"{base}/{TOTAL_3MM}/{FAST.trainer_folder}"
    fs.copy(f"{trainer}/fold_0/checkpoint_final.pth", f"{trainer}/fold_1/checkpoint_final.pth")
    store = WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=uri))
    store.model_folder(FAST)
    assert not (store.root / TOTAL_3MM / FAST.trainer_folder / "fold_1").exists()
    paths = store.checkpoint_paths(FAST.model_copy(update={"folds": [0, 1]}))
    assert [p.parent.name for p in paths] == ["fold_0", "fold_1"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]


def test_a_store_that_stops_answering_during_a_fetch_is_waited_for(
    tmp_path: Path, tiny_root: Path, settings_for: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica starting while the bucket does not answer: its fetch is tried again."""
    from raytseg import retry
    from raytseg.weights import store as store_module

    uri = f"memory://raytseg-tests/{tmp_path.name}/weights"
    _upload(tiny_root, uri, [TOTAL_3MM])
    real_get, failures = store_module._get_file, [ConnectionResetError("reset"), TimeoutError("timed out")]

    def flaky_get(fs: Any, remote: str, local: Path) -> None:
        if failures:
            raise failures.pop(0)
        real_get(fs, remote, local)

    monkeypatch.setattr(store_module, "_get_file", flaky_get)
    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    store = WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=uri))
    assert store.model_folder(FAST).is_dir()
    assert not failures
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no half-fetched folder


def test_zip_uri_is_downloaded_once_and_extracted(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Any
) -> None:
    archive = zipper(tiny_root, [TOTAL_3MM, TOTAL_6MM], tmp_path / "weights.zip")
    http_server.serve("/all/weights.zip", archive.read_bytes())
    uri = f"{http_server.url}/all/weights.zip"
    store = WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=uri))
    assert store.model_folder(FAST).is_dir()
    assert store.model_folder(model("total", "fastest")).is_dir()
    assert len(http_server.requests) == 1
    assert [p.name for p in store.root.parent.iterdir()] == [store.root.name]


def test_concurrent_fetches_of_one_model_do_not_corrupt_the_cache(
    tmp_path: Path, copy_models: CopyModels, settings_for: MakeSettings
) -> None:
    import threading

    remote = copy_models(tmp_path / "remote", [TOTAL_3MM])
    uri = f"file://{remote}"
    barrier = threading.Barrier(4)
    results: list[Path] = []

    def fetch() -> None:
        store = WeightsStore(settings_for(tmp_path, RAYTSEG_WEIGHTS=uri))
        barrier.wait()
        results.append(store.checkpoint_paths(FAST)[0])

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert len(set(results)) == 1
    original = remote / TOTAL_3MM / FAST.trainer_folder / "fold_0" / "checkpoint_final.pth"
    assert results[0].read_bytes() == original.read_bytes()
    cache = results[0].parents[3]
    assert sorted(p.name for p in cache.iterdir()) == [TOTAL_3MM]  # no temporary folders left
