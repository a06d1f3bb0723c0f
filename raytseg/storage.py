"""Paths and fsspec URIs behind one small interface.

Inputs and outputs may be local paths or any fsspec URI (``s3://``, ``gs://``,
``memory://``, ``https://``). Writes never leave a partial object: local files are
written under a temporary name in the same folder and renamed; object stores get one
whole-object PUT, which readers see entirely or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytseg.errors import RaytsegError, StorageError, StorageUnavailableError

if TYPE_CHECKING:
    from raytseg.retry import RetryPolicy

log = logging.getLogger(__name__)
_MOVE_THREADS = 8


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` locations other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike[str]) -> Path:
    text = str(location)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URI; errors become ``StorageError``."""
    import fsspec

    options = _HTTP_OPTIONS if uri.split("://", 1)[0].lower() in ("http", "https") else {}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"Cannot open {uri!r}: {exc}. Install the filesystem's package (e.g. s3fs)."
        ) from exc
    return fs, path


# Why no read follows a redirect, and what to do instead (fsspec's http(s) and DICOMweb).
REDIRECT_ADVICE = (
    "raytseg does not follow redirects, so that none can lead outside the allowed locations: "
    "use the final URI."
)


async def _refuse_redirects(response: Any) -> None:
    """aiohttp's status check for fsspec's HTTP reads: errors as usual, and a redirect refused.

    A job's locations are checked against ``jobs.allowed_prefixes`` by their URI; a
    redirect could lead anywhere, so it is not followed but reported.
    """
    if 300 <= response.status < 400:
        target = response.headers.get("Location", "elsewhere")
        where = f"{response.url} redirects (HTTP {response.status}) to {target}"
        raise StorageError(f"{where}. {REDIRECT_ADVICE}")
    if response.status != 404:  # fsspec turns a 404 into FileNotFoundError itself
        response.raise_for_status()


_HTTP_OPTIONS: dict[str, Any] = {
    "allow_redirects": False,
    "client_kwargs": {"raise_for_status": _refuse_redirects},
}


def join(location: str, *names: str) -> str:
    """Join path components onto a path or URI with '/'."""
    base = str(location).rstrip("/")
    return "/".join([base, *names])


def base_name(location: str) -> str:
    """The last component of a path or URI: a file's name, or a folder's own name."""
    return posixpath.basename(str(location).rstrip("/"))


def parent(location: str) -> str:
    """The folder holding ``location`` (a path or URI)."""
    if is_uri(location):
        scheme, path = location.split("://", 1)
        return f"{scheme}://{posixpath.dirname(path.rstrip('/'))}"
    return str(local_path(location).parent)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """The whole content of a file or object."""
    try:
        if is_uri(location):
            fs, path = filesystem(str(location))
            data: bytes = fs.cat_file(path)
            return data
        return local_path(location).read_bytes()
    except FileNotFoundError as exc:
        raise StorageError(f"{location} does not exist. Check the path or URI.") from exc
    except RaytsegError:
        raise
    except Exception as exc:  # fsspec backends raise their own client errors, not only OSError
        raise storage_error(str(location), "read", exc) from exc


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` so that readers see either the old object or the whole new one."""
    try:
        if is_uri(location):
            fs, path = filesystem(str(location))
            fs.pipe_file(path, data)
        else:
            _write_local_atomically(local_path(location), data)
    except RaytsegError:
        raise
    except Exception as exc:
        raise storage_error(str(location), "write", exc) from exc


def storage_error(location: str, action: str, exc: BaseException) -> StorageError:
    """``exc``, raised while ``action``-ing ``location``, as a member of the error tree:
    ``StorageUnavailableError`` (503, a later try may work) when the storage did not answer."""
    from raytseg.retry import is_transient

    if is_transient(exc):
        return StorageUnavailableError(
            f"Could not {action} {location}: the storage did not answer ({exc}). Retry later."
        )
    return StorageError(f"Could not {action} {location}: {exc}. Check the location and your credentials.")


def make_dirs(location: str | os.PathLike[str]) -> None:
    """Create a local folder (object stores have no folders to create)."""
    if not is_uri(location):
        try:
            local_path(location).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"Could not create folder {location}: {exc}") from exc


def fs_and_path(location: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``location`` and its path there (a local path: absolute)."""
    if is_uri(location):
        fs, path = filesystem(location)
        return fs, str(path)
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), str(local_path(location).absolute())


def move_all(fs: Any, moves: Sequence[tuple[str, str]], retry: RetryPolicy) -> None:
    """Move staged files into place (``fs`` paths), a few at a time: on S3 each move is a
    copy and a delete. Repeating a move that went through is harmless (a retried or resumed
    commit). Raises the first failure, after its retries."""

    def move(src: str, dst: str) -> None:
        retry.call(lambda: _move(fs, src, dst), f"Committing {dst}")

    with ThreadPoolExecutor(max_workers=_MOVE_THREADS, thread_name_prefix="raytseg-commit") as pool:
        for done in [pool.submit(move, src, dst) for src, dst in moves]:
            done.result()


def remove_files(fs: Any, paths: Sequence[str]) -> None:
    """Delete files (``fs`` paths); one already gone is no error (a repeated clean-up)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


def remove_tree(location: str) -> None:
    """Delete a folder or prefix and everything under it; errors are only logged."""
    try:
        fs, path = fs_and_path(location)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as exc:  # leftovers in staging are harmless: never read as outputs
        log.warning("Could not remove %s: %s", location, exc)


def _move(fs: Any, src: str, dst: str) -> None:
    try:
        fs.mv(src, dst)
    except FileNotFoundError:
        # A repeated move whose first try went through: the source is gone, the copy is there.
        if not fs.exists(dst):
            raise


def _write_local_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
