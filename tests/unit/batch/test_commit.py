"""Staging, commit and completion markers, on local folders and memory://."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raytseg import storage
from raytseg.batch.commit import MARKER_NAME, OutputStore
from raytseg.retry import RetryPolicy

FILES = {"liver.nii.gz": b"liver bytes", "spleen.nii.gz": b"spleen bytes", "statistics.json": b"{}"}


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    import fsspec

    location = f"memory://commit-{uuid.uuid4().hex}"
    yield location
    fs = fsspec.filesystem("memory")
    if fs.exists(location.removeprefix("memory://")):
        fs.rm(location.removeprefix("memory://"), recursive=True)


def files_under(location: str) -> dict[str, bytes]:
    fs, path = storage.fs_and_path(location)
    if not fs.exists(path):
        return {}
    fs.invalidate_cache()
    return {str(p)[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def stage(store: OutputStore, item_id: str, attempt: str, files: dict[str, bytes]) -> str:
    staged = store.staging_dir(item_id, attempt)
    for name, data in files.items():
        storage.write_bytes(storage.join(staged, name), data)
    return staged


def test_commit_moves_staged_files_and_marks_the_item(root: str) -> None:
    store = OutputStore(storage.join(root, "_staging"), RetryPolicy(retries=0))
    staged = stage(store, "case1", "run1-a", FILES)
    store.commit(staged, storage.join(root, "case1"), list(FILES), {"id": "case1", "attempt": "run1-a"})
    store.discard("case1")

    written = files_under(root)
    assert json.loads(written.pop(f"case1/{MARKER_NAME}")) == {"attempt": "run1-a", "id": "case1"}
    assert written == {f"case1/{name}": data for name, data in FILES.items()}  # nothing left in staging
    assert store.read_markers([storage.join(root, "case1"), storage.join(root, "case2")]) == {
        storage.join(root, "case1"): {"attempt": "run1-a", "id": "case1"}
    }


def test_an_interrupted_commit_is_never_complete_and_is_repaired(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = OutputStore(storage.join(root, "_staging"), RetryPolicy(retries=0))
    item = storage.join(root, "case1")
    first = stage(store, "case1", "run1-a", {"old.nii.gz": b"from other options", **FILES})
    store.commit(first, item, ["old.nii.gz", *FILES], {"attempt": "run1-a"})
    assert store.read_markers([item])

    moved: list[str] = []
    real_move = storage._move

    def dies_after_one_move(fs: Any, src: str, dst: str) -> None:
        if moved:
            raise PermissionError("the process died here")
        moved.append(dst)
        real_move(fs, src, dst)

    monkeypatch.setattr(storage, "_move", dies_after_one_move)
    second = stage(store, "case1", "run2-b", {"liver.nii.gz": b"new liver", "spleen.nii.gz": b"new spleen"})
    with pytest.raises(PermissionError):
        store.commit(second, item, ["liver.nii.gz", "spleen.nii.gz"], {"attempt": "run2-b"})
    # The marker went first, so the mix of old and new files is not complete.
    assert store.read_markers([item]) == {}
    assert files_under(item)["liver.nii.gz"] == b"new liver"
    assert "old.nii.gz" not in files_under(item)  # stale files go before new ones arrive

    monkeypatch.setattr(storage, "_move", real_move)
    third = stage(store, "case1", "run3-c", {"liver.nii.gz": b"new liver", "spleen.nii.gz": b"new spleen"})
    store.commit(third, item, ["liver.nii.gz", "spleen.nii.gz"], {"attempt": "run3-c"})
    store.discard("case1")
    assert store.read_markers([item]) == {item: {"attempt": "run3-c"}}
    assert sorted(files_under(item)) == sorted([MARKER_NAME, "liver.nii.gz", "spleen.nii.gz"])
    assert files_under(storage.join(root, "_staging", "case1")) == {}


def test_a_move_whose_reply_was_lost_is_not_redone(tmp_path: Path) -> None:
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    (tmp_path / "dst").write_bytes(b"moved")
    storage._move(fs, str(tmp_path / "src"), str(tmp_path / "dst"))  # source gone, copy there
    with pytest.raises(FileNotFoundError):
        storage._move(fs, str(tmp_path / "src"), str(tmp_path / "other"))


def test_transient_errors_during_commit_are_retried(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from raytseg import retry as retry_module

    monkeypatch.setattr(retry_module.time, "sleep", lambda seconds: None)
    failures = iter([OSError("503 Slow Down"), ConnectionResetError("reset")])
    real_move = storage._move

    def flaky_move(fs: Any, src: str, dst: str) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real_move(fs, src, dst)

    monkeypatch.setattr(storage, "_move", flaky_move)
    store = OutputStore(storage.join(root, "_staging"), RetryPolicy(retries=3))
    staged = stage(store, "case1", "a", FILES)
    store.commit(staged, storage.join(root, "case1"), list(FILES), {"attempt": "a"})
    assert sorted(files_under(storage.join(root, "case1"))) == sorted([MARKER_NAME, *FILES])


def test_unreadable_markers_mean_not_complete(root: str) -> None:
    store = OutputStore(storage.join(root, "_staging"), RetryPolicy(retries=0))
    storage.write_bytes(storage.join(root, "case1", MARKER_NAME), b"{truncated")
    storage.write_bytes(storage.join(root, "case2", MARKER_NAME), b'{"id": "case2"}')
    items = [storage.join(root, "case1"), storage.join(root, "case2")]
    assert store.read_markers(items) == {items[1]: {"id": "case2"}}
