"""Atomic per-item outputs: stage, commit, then mark complete.

    <output>/_staging/<id>/<attempt>/...   1. every file is written here first
    <output>/<id>/...                      2. commit: the marker is removed, stale files too,
                                              then each staged file is moved here
    <output>/<id>/_raytseg_done.json       3. the marker, written last

An item is complete exactly when its marker exists; the marker also records what the
item produced (files, timings, statistics), so a rerun reports skipped items fully
without reading their outputs. Each object is put whole (S3 PUT/COPY, a local rename), so
no file is ever half-written; a commit that dies midway leaves files without a marker,
which the next run replaces. Output names are deterministic, so a retried item rewrites
the same keys with the same bytes and never duplicates anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from raytseg import storage
from raytseg.retry import RetryPolicy

log = logging.getLogger(__name__)

MARKER_NAME = "_raytseg_done.json"


def marker_location(item_dir: str) -> str:
    return storage.join(item_dir, MARKER_NAME)


class OutputStore:
    """Stages, commits and marks the outputs of the items of one job."""

    def __init__(self, staging_root: str, retry: RetryPolicy) -> None:
        self.staging_root = staging_root
        self.retry = retry

    def staging_dir(self, item_id: str, attempt: str) -> str:
        """Where an attempt writes its files before they are committed."""
        return storage.join(self.staging_root, item_id, attempt)

    def commit(self, staged: str, item_dir: str, names: Sequence[str], marker: Mapping[str, Any]) -> None:
        """Move the staged ``names`` into ``item_dir`` and mark it complete.

        Raises:
            StorageError, OSError: a step failed after its retries; the item then has no
                marker, so it is not complete and the next run redoes it.
        """
        fs, final = storage.fs_and_path(item_dir)
        _, source = storage.fs_and_path(staged)
        marker_path = storage.join(final, MARKER_NAME)
        self._call(lambda: storage.remove_files(fs, [marker_path]), f"Unmarking {item_dir}")
        existing = self._call(lambda: _files_under(fs, final), f"Listing {item_dir}")
        stale = sorted(existing - {storage.join(final, name) for name in names})
        if stale:
            log.info("Removing %d stale file(s) from %s", len(stale), item_dir)
            self._call(lambda: storage.remove_files(fs, stale), f"Cleaning {item_dir}")
        storage.make_dirs(item_dir)
        moves = [(storage.join(source, n), storage.join(final, n)) for n in names]
        storage.move_all(fs, moves, self.retry)  # the first failure is raised: no marker then
        data = json.dumps(marker, indent=1, sort_keys=True).encode()
        self._call(lambda: fs.pipe_file(marker_path, data), f"Marking {item_dir}")

    def discard(self, item_id: str, attempt: str | None = None) -> None:
        """Remove an attempt's staged files (all attempts of the item when None); best effort."""
        location = self.staging_dir(item_id, attempt) if attempt else storage.join(self.staging_root, item_id)
        storage.remove_tree(location)

    def read_markers(self, item_dirs: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{item_dir: marker}`` for the items that are complete."""
        found: dict[str, dict[str, Any]] = {}
        by_fs: dict[str, tuple[Any, dict[str, str]]] = {}
        for item_dir in item_dirs:
            fs, path = storage.fs_and_path(item_dir)
            by_fs.setdefault(_fs_key(item_dir), (fs, {}))[1][storage.join(path, MARKER_NAME)] = item_dir
        for fs, paths in by_fs.values():
            contents = self._call(
                lambda fs=fs, paths=paths: _cat_existing(fs, list(paths)), "Reading markers"
            )
            for path, data in contents.items():
                marker = _parse_marker(data, path)
                if marker is not None:
                    found[paths[path]] = marker
        return found

    def _call(self, fn: Any, what: str) -> Any:
        return self.retry.call(fn, what)


def _fs_key(location: str) -> str:
    return location.split("://", 1)[0] if storage.is_uri(location) else "file"


def _files_under(fs: Any, folder: str) -> set[str]:
    fs.invalidate_cache(folder)  # a listing cached by this long-lived worker may be stale
    try:
        return {str(p) for p in fs.find(folder)}
    except FileNotFoundError:
        return set()


def _cat_existing(fs: Any, paths: list[str]) -> dict[str, bytes]:
    if not paths:
        return {}
    fs.invalidate_cache()  # listings cached by an earlier call would hide new markers
    results = fs.cat(paths, on_error="return")
    if not isinstance(results, dict):  # fsspec returns bare bytes for a single plain path
        results = {paths[0]: results}
    contents = {}
    for path, value in results.items():
        if isinstance(value, FileNotFoundError):
            continue
        if isinstance(value, BaseException):
            raise value
        contents[str(path)] = bytes(value)
    return contents


def _parse_marker(data: bytes, path: str) -> dict[str, Any] | None:
    try:
        marker = json.loads(data)
    except ValueError:
        log.warning("Ignoring the unreadable marker %s: the item will be redone.", path)
        return None
    return marker if isinstance(marker, dict) else None
