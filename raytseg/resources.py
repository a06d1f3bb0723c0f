"""TotalSegmentator's data files (classifiers, the SNOMED-CT mapping), found where users have them.

They ship inside TotalSegmentator's PyPI package (``totalsegmentator/resources/``) and are
never copied into raytseg's source. A file is taken from, in order:

1. ``RAYTSEG_TS_RESOURCES``: a folder holding the files (e.g. the ``resources`` folder of an
   unpacked TotalSegmentator wheel, mounted read-only in a container);
2. ``<weights folder>/totalsegmentator_resources``, where ``raytseg weights import`` puts
   them from a TotalSegmentator wheel or a folder holding its package (``import_resources``);
3. the installed TotalSegmentator package (``pip install --no-deps TotalSegmentator==2.18.0``
   installs it without its dependencies; the package is never imported).

Only these locations are trusted: the contrast-phase classifier is a pickle, and a pickle
runs code when loaded.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from raytseg.errors import InvalidOptionError, MissingResourceError

INSTALL_HINT = "pip install --no-deps TotalSegmentator==2.18.0"
IMPORTED_FOLDER = "totalsegmentator_resources"  # inside the weights folder
PACKAGE_FOLDER = ("totalsegmentator", "resources")  # inside a wheel or a package's parent folder
_MAX_FILE_BYTES = 64 * 2**20  # the largest of 2.18's files has 1.6 MB


def resource_path(name: str, needed_for: str) -> Path:
    """The trusted location of TotalSegmentator's resource file ``name``.

    Raises:
        MissingResourceError: in neither location; says how to provide it.
    """
    for folder in _folders():
        path = folder / name
        if path.is_file():
            return path
    raise MissingResourceError(
        f"{needed_for} needs TotalSegmentator's {name}, which is not in $RAYTSEG_TS_RESOURCES, the "
        f"weights folder's {IMPORTED_FOLDER} or an installed TotalSegmentator package. Install it "
        f"with `{INSTALL_HINT}`, import it from a wheel with `raytseg weights import "
        "TotalSegmentator-2.18.0-py3-none-any.whl`, or point RAYTSEG_TS_RESOURCES at the "
        "resources folder of a TotalSegmentator 2.18 wheel."
    )


def is_package_source(path: Path) -> bool:
    """Whether ``path`` is meant for ``import_resources``: a wheel, or a folder."""
    return path.suffix == ".whl" or path.is_dir()


def import_resources(source: Path, weights_dir: Path) -> list[Path]:
    """Copy the files of TotalSegmentator's ``resources/`` from a wheel (``.whl``) or a folder
    holding ``totalsegmentator/resources`` (an unpacked wheel, a source tree, site-packages)
    into ``weights_dir/IMPORTED_FOLDER``, each file replaced whole. Returns the files written.

    Raises:
        InvalidOptionError: ``source`` holds no such files (or one is implausibly large).
    """
    target = weights_dir / IMPORTED_FOLDER
    written = []
    for name, data in _package_files(source):
        target.mkdir(parents=True, exist_ok=True)
        written.append(_replace_file(target / name, data))
    if not written:
        raise InvalidOptionError(
            f"{source} holds no {'/'.join(PACKAGE_FOLDER)} files: give a TotalSegmentator wheel "
            "(pip download --no-deps TotalSegmentator==2.18.0) or a folder containing its package."
        )
    return written


def _package_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file directly in the package's ``resources`` folder."""
    if source.is_dir():
        folder = source.joinpath(*PACKAGE_FOLDER)
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.is_file():
                _check_size(path.name, path.stat().st_size)
                yield path.name, path.read_bytes()
        return
    if not zipfile.is_zipfile(source):
        raise InvalidOptionError(f"{source} is neither a wheel (a zip) nor a folder.")
    with zipfile.ZipFile(source) as wheel:
        for info in wheel.infolist():
            parent, _, name = info.filename.rpartition("/")
            if tuple(parent.split("/")) == PACKAGE_FOLDER and name not in ("", ".", ".."):
                _check_size(name, info.file_size)
                yield name, wheel.read(info)


def _check_size(name: str, size: int) -> None:
    if size > _MAX_FILE_BYTES:
        raise InvalidOptionError(f"{name} has {size} bytes: not a TotalSegmentator resource file.")


def _replace_file(path: Path, data: bytes) -> Path:
    """Write beside ``path``, then rename over it: a reader sees the old file or the new one."""
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)
    os.replace(partial, path)
    return path


def _folders() -> list[Path]:
    from raytseg.config import Settings, resources_dir

    configured = resources_dir()
    imported = Settings.from_env().weights_dir / IMPORTED_FOLDER
    spec = importlib.util.find_spec("totalsegmentator")
    installed = [] if spec is None else [Path(p) / "resources" for p in spec.submodule_search_locations or []]
    return ([configured] if configured is not None else []) + [imported] + installed
