from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raytseg.config import Settings
from raytseg.errors import (
    LicenseError,
    MissingWeightsError,
    StorageError,
    UnsafeArchiveError,
    WeightsIntegrityError,
)
from raytseg.tasks.registry import get_task
from raytseg.weights.fetch import KNOWN_SHA256, download_dataset, download_task, import_zip
from raytseg.weights.license import set_license
from raytseg.weights.store import WeightsStore, dataset_folder_name

MakeSettings = Callable[..., Settings]
Zipper = Callable[[Path, list[str], Path], Path]
TOTAL_3MM = dataset_folder_name(297)
TOTAL_6MM = dataset_folder_name(298)
ORGANS = dataset_folder_name(291)
BODY_6MM = dataset_folder_name(300)
APPENDICULAR = dataset_folder_name(304)
KEY = "aca_ABCDEFGHIJ1234"


def release_path(dataset_id: int, release: str = "v2.0.0-weights") -> str:
    return f"/{release}/{dataset_folder_name(dataset_id)}.zip"


def contents(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def serve_zip(
    server: Any, tiny_root: Path, zipper: Zipper, tmp_path: Path, path: str, names: list[str]
) -> None:
    server.serve(path, zipper(tiny_root, names, tmp_path / "served.zip").read_bytes())


# --- downloads ---------------------------------------------------------------------------


def test_download_installs_the_folder(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Zipper
) -> None:
    serve_zip(http_server, tiny_root, zipper, tmp_path, release_path(291), [ORGANS])
    settings = settings_for(tmp_path, http_server.url)
    folder = download_dataset(settings.weights_dir, 291, settings, license_key=None)
    assert folder == settings.weights_dir / ORGANS
    assert contents(settings.weights_dir) == [ORGANS]  # no temporary files left
    assert http_server.requests == [("GET", release_path(291), b"")]
    spec = get_task("total").modes["default"].models[0]
    assert WeightsStore(settings).model_folder(spec).is_dir()


def test_http_404_is_a_clean_error_and_leaves_nothing(
    tmp_path: Path, http_server: Any, settings_for: MakeSettings
) -> None:
    settings = settings_for(tmp_path, http_server.url)
    with pytest.raises(StorageError, match="HTTP 404"):
        download_dataset(settings.weights_dir, 291, settings, license_key=None)
    assert contents(settings.weights_dir) == []


def test_unreachable_server_is_a_storage_error(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path, "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(StorageError, match="Download of http://127.0.0.1:9/"):
        download_dataset(settings.weights_dir, 291, settings, license_key=None)
    assert contents(settings.weights_dir) == []


def test_corrupt_zip_leaves_nothing(tmp_path: Path, http_server: Any, settings_for: MakeSettings) -> None:
    http_server.serve(release_path(291), b"PK\x03\x04 this is not really a zip" * 100)
    settings = settings_for(tmp_path, http_server.url)
    with pytest.raises(WeightsIntegrityError, match="not a valid zip"):
        download_dataset(settings.weights_dir, 291, settings, license_key=None)
    assert contents(settings.weights_dir) == []


def test_checksum_mismatch_leaves_nothing(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Zipper
) -> None:
    assert 297 in KNOWN_SHA256
    serve_zip(http_server, tiny_root, zipper, tmp_path, release_path(297), [TOTAL_3MM])
    settings = settings_for(tmp_path, http_server.url)
    with pytest.raises(WeightsIntegrityError, match="Checksum mismatch.*checkpoint_final.pth"):
        download_dataset(settings.weights_dir, 297, settings, license_key=None)
    assert contents(settings.weights_dir) == []


def test_zip_without_the_dataset_is_refused(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Zipper
) -> None:
    serve_zip(http_server, tiny_root, zipper, tmp_path, release_path(291), [BODY_6MM])
    settings = settings_for(tmp_path, http_server.url)
    with pytest.raises(WeightsIntegrityError, match="no Dataset291_"):
        download_dataset(settings.weights_dir, 291, settings, license_key=None)
    assert contents(settings.weights_dir) == []


def test_download_larger_than_the_limit_is_refused(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Zipper
) -> None:
    serve_zip(http_server, tiny_root, zipper, tmp_path, release_path(291), [ORGANS])
    settings = settings_for(tmp_path, http_server.url, RAYTSEG_MAX_ARCHIVE_BYTES="1000")
    with pytest.raises(UnsafeArchiveError, match="RAYTSEG_MAX_ARCHIVE_BYTES"):
        download_dataset(settings.weights_dir, 291, settings, license_key=None)
    assert contents(settings.weights_dir) == []


def test_unpublished_dataset_is_missing_not_downloadable(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path, "http://127.0.0.1:9")
    with pytest.raises(MissingWeightsError, match="957 is not published"):
        download_dataset(settings.weights_dir, 957, settings, license_key=None)


def test_licensed_download_posts_totalsegmentator_request(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Zipper
) -> None:
    serve_zip(http_server, tiny_root, zipper, tmp_path, "/download_weights", [APPENDICULAR])
    settings = settings_for(tmp_path, http_server.url)
    folder = download_dataset(settings.weights_dir, 304, settings, license_key=KEY)
    assert folder == settings.weights_dir / APPENDICULAR
    [(method, path, body)] = http_server.requests
    assert (method, path) == ("POST", "/download_weights")
    assert json.loads(body) == {"license_number": KEY, "task": "appendicular_bones", "version": "2.18.0"}


def test_licensed_download_without_a_key_asks_for_one(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path, "http://127.0.0.1:9")
    with pytest.raises(LicenseError, match="raytseg set-license -l aca_"):
        download_dataset(settings.weights_dir, 304, settings, license_key=None)


def test_refused_license_is_a_license_error(
    tmp_path: Path, http_server: Any, settings_for: MakeSettings
) -> None:
    http_server.serve_json("/download_weights", {"status": "invalid_license"}, status=403)
    settings = settings_for(tmp_path, http_server.url)
    with pytest.raises(LicenseError, match="refused the license key"):
        download_dataset(settings.weights_dir, 304, settings, license_key=KEY)
    assert contents(settings.weights_dir) == []


def test_download_task_fetches_only_missing_datasets(
    tmp_path: Path,
    tiny_root: Path,
    http_server: Any,
    settings_for: MakeSettings,
    zipper: Zipper,
    copy_models: Callable[[Path, list[str]], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(tmp_path, http_server.url)
    copy_models(settings.weights_dir, [TOTAL_6MM])
    serve_zip(http_server, tiny_root, zipper, tmp_path, release_path(297), [TOTAL_3MM])
    monkeypatch.delitem(KNOWN_SHA256, 297)  # the served 297 is synthetic
    folders = download_task("total", settings, fast=True)
    assert folders == [settings.weights_dir / TOTAL_3MM, settings.weights_dir / TOTAL_6MM]
    assert [path for _, path, _ in http_server.requests] == [release_path(297)]
    assert download_task("total", settings, fast=True) == folders  # all present: no request
    assert len(http_server.requests) == 1


def test_download_task_uses_the_stored_license(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Zipper
) -> None:
    settings = settings_for(tmp_path, http_server.url)
    set_license(KEY, settings)
    serve_zip(http_server, tiny_root, zipper, tmp_path, "/download_weights", [APPENDICULAR])
    assert download_task("appendicular_bones", settings) == [settings.weights_dir / APPENDICULAR]
    assert json.loads(http_server.requests[0][2])["license_number"] == KEY


def test_download_refuses_a_second_folder_for_an_id(
    tmp_path: Path, tiny_root: Path, http_server: Any, settings_for: MakeSettings, zipper: Zipper
) -> None:
    settings = settings_for(tmp_path, http_server.url)
    (settings.weights_dir / "Dataset291_old_name" / "x").mkdir(parents=True)
    serve_zip(http_server, tiny_root, zipper, tmp_path, release_path(291), [ORGANS])
    with pytest.raises(WeightsIntegrityError, match="Dataset291_old_name"):
        download_dataset(settings.weights_dir, 291, settings, license_key=None)
    assert contents(settings.weights_dir) == ["Dataset291_old_name"]


# --- importing zips ----------------------------------------------------------------------


def test_import_zip_installs_every_dataset_and_keeps_existing_parts(
    tmp_path: Path, tiny_root: Path, settings_for: MakeSettings, zipper: Zipper
) -> None:
    settings = settings_for(tmp_path)
    archive = zipper(tiny_root, [TOTAL_3MM, ORGANS], tmp_path / "weights.zip")
    existing = settings.weights_dir / ORGANS / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    existing.mkdir(parents=True)
    (existing / "mine.txt").write_text("keep me")
    installed = import_zip(archive, settings.weights_dir, settings)
    assert installed == [settings.weights_dir / ORGANS, settings.weights_dir / TOTAL_3MM]
    assert contents(settings.weights_dir) == [ORGANS, TOTAL_3MM]
    assert (existing / "mine.txt").read_text() == "keep me"
    assert len(contents(settings.weights_dir / ORGANS)) == 2
    fast = get_task("total").modes["fast"].models[0]
    assert WeightsStore(settings).model_folder(fast).is_dir()


def _evil_zip(path: Path, member: str, *, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Dataset291_x/plans.json", "{}")
        info = zipfile.ZipInfo(member)
        if symlink:
            info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd" if symlink else "owned")
    return path


@pytest.mark.parametrize(
    ("member", "symlink"),
    [
        ("../evil.txt", False),
        ("Dataset291_x/../../evil.txt", False),
        ("/tmp/evil.txt", False),
        ("Dataset291_x/l", True),
    ],
)
def test_import_zip_refuses_unsafe_members(
    tmp_path: Path, settings_for: MakeSettings, member: str, symlink: bool
) -> None:
    settings = settings_for(tmp_path)
    archive = _evil_zip(tmp_path / "evil.zip", member, symlink=symlink)
    with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
        import_zip(archive, settings.weights_dir, settings)
    assert contents(settings.weights_dir) == []
    assert not (tmp_path / "evil.txt").exists()


def test_import_zip_refuses_archives_past_the_size_limit(
    tmp_path: Path, tiny_root: Path, settings_for: MakeSettings, zipper: Zipper
) -> None:
    settings = settings_for(tmp_path, RAYTSEG_MAX_ARCHIVE_BYTES="10000")
    archive = zipper(tiny_root, [ORGANS], tmp_path / "weights.zip")
    with pytest.raises(UnsafeArchiveError, match="more than the limit"):
        import_zip(archive, settings.weights_dir, settings)
    assert contents(settings.weights_dir) == []


def test_import_zip_of_synthetic_297_skips_checksums(
    tmp_path: Path, tiny_root: Path, settings_for: MakeSettings, zipper: Zipper
) -> None:
    settings = settings_for(tmp_path)
    archive = zipper(tiny_root, [TOTAL_3MM], tmp_path / "weights.zip")
    assert import_zip(archive, settings.weights_dir, settings) == [settings.weights_dir / TOTAL_3MM]


def test_import_zip_checks_known_checksums_of_real_folders(
    tmp_path: Path, tiny_root: Path, settings_for: MakeSettings, zipper: Zipper
) -> None:
    settings = settings_for(tmp_path)
    unmarked = tmp_path / "unmarked"
    archive = zipper(tiny_root, [TOTAL_3MM], tmp_path / "weights.zip")
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(unmarked.with_suffix(".zip"), "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("RAYTSEG_SYNTHETIC_WEIGHTS.txt"):
                dst.writestr(info, src.read(info))
    with pytest.raises(WeightsIntegrityError, match="Checksum mismatch"):
        import_zip(unmarked.with_suffix(".zip"), settings.weights_dir, settings)
    assert contents(settings.weights_dir) == []


def test_import_zip_without_datasets_or_file(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path)
    with pytest.raises(StorageError, match="does not exist"):
        import_zip(tmp_path / "nope.zip", settings.weights_dir, settings)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("a/readme.txt", "x")
        zf.writestr("b/readme.txt", "x")
    with pytest.raises(WeightsIntegrityError, match="no DatasetNNN_"):
        import_zip(tmp_path / "other.zip", settings.weights_dir, settings)
    assert contents(settings.weights_dir) == []
