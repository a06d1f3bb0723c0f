"""What a batch job segments: work items from a listed prefix or a manifest.

A prefix is listed once, recursively. Items are:

- every NIfTI file (``.nii``, ``.nii.gz``) and every zip (a DICOM series, zipped);
- every folder that directly holds DICOM-looking files (``.dcm``, ``.ima``, no
  extension, or a numeric one such as ``CT.1.2.840...``): one DICOM series.

Other files (``.json``, ``.txt``...) are ignored. A DICOMweb study or QIDO-RS search
(``raytseg.dicomweb``: ``dicomweb+https://host/prefix/series?Modality=CT``) gives one item
per series it names, with the Series Instance UID as id. A manifest (``.csv``, ``.parquet``,
``.jsonl``) lists items instead: ``input_uri`` and optionally ``id``, ``task`` (overrides
the job's task) and ``output`` (the item's folder instead of ``<output>/<id>``); relative
locations are resolved against the manifest's folder (inputs) or the job's output (outputs).

Item ids name the output folders, so they are safe path components:
``[A-Za-z0-9][A-Za-z0-9._-]*``. Listed items get them from their path below the prefix
(``s0001/ct.nii.gz`` -> ``s0001_ct``); two inputs that would share an id (ignoring case,
for case-insensitive filesystems) stop the job with both names, never a silent rename.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from raytseg import dicomweb, storage
from raytseg.errors import BatchInputError
from raytseg.retry import RetryPolicy

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq", ".jsonl", ".ndjson")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ZIP_SUFFIX = ".zip"
_DICOM_SUFFIXES = {"dcm", "dicom", "ima"}
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MANIFEST_COLUMNS = ("id", "input_uri", "task", "output")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One input to segment and where its outputs go."""

    id: str
    input: str  # local path or URI of a NIfTI file, DICOM zip or DICOM folder
    output: str  # the item's folder
    task: str | None = None  # overrides the job's task

    def to_json(self) -> str:
        return json.dumps([self.id, self.input, self.output, self.task])

    @classmethod
    def from_json(cls, text: str) -> WorkItem:
        item_id, source, output, task = json.loads(text)
        return cls(item_id, source, output, task)


def is_manifest(location: str) -> bool:
    return location.lower().endswith(MANIFEST_SUFFIXES)


def work_items(source: str, output: str, retry: RetryPolicy | None = None) -> list[WorkItem]:
    """The job's items from a prefix or manifest ``source``; outputs under ``output``.

    Raises:
        BatchInputError: nothing to segment, a bad manifest, or ids that collide.
        StorageError: the listing or the manifest could not be read.
    """
    retry = retry or RetryPolicy()
    if dicomweb.is_dicomweb(source):
        items = _dicomweb_items(source, output, retry)
    elif is_manifest(source):
        items = list(_manifest_items(source, output, retry))
    else:
        items = [
            WorkItem(item_id, uri, storage.join(output, item_id))
            for item_id, uri in _listed(source, output, retry)
        ]
    if not items:
        raise BatchInputError(
            f"Found nothing to segment in {source}: no NIfTI files, DICOM zips or DICOM folders."
        )
    _check_unique(items)
    return items


# --- ids -----------------------------------------------------------------------------


def item_id_from_path(relative: str) -> str:
    """A safe id from a path below the prefix: extension dropped, other characters -> ``_``."""
    name = relative.strip("/")
    lower = name.lower()
    for suffix in (*_NIFTI_SUFFIXES, _ZIP_SUFFIX):
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    safe = _UNSAFE_CHARS.sub("_", name).lstrip("._-")[:200]
    if not safe:
        raise BatchInputError(
            f"Cannot make an item id from {relative!r}. List the input in a manifest with an explicit id."
        )
    return safe


def check_item_id(item_id: str, where: str) -> str:
    if not _ID_PATTERN.fullmatch(item_id):
        raise BatchInputError(
            f"{where}: id {item_id!r} is not a safe folder name. Use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (at most 200 characters)."
        )
    return item_id


def _check_unique(items: Sequence[WorkItem]) -> None:
    by_id: dict[str, WorkItem] = {}
    by_output: dict[str, WorkItem] = {}
    clashes = []
    for item in items:
        for key, seen in ((item.id.lower(), by_id), (item.output.rstrip("/"), by_output)):
            if key in seen:
                clashes.append(f"  {seen[key].input} and {item.input} -> {key}")
            seen[key] = item
    if clashes:
        raise BatchInputError(
            "Several inputs map to the same item id or output folder (ids ignore case):\n"
            + "\n".join(clashes)
            + "\nRename the inputs, or list them in a manifest with distinct ids."
        )


# --- listing a prefix ----------------------------------------------------------------


def _listed(source: str, output: str, retry: RetryPolicy) -> list[tuple[str, str]]:
    """``(id, uri)`` of every item under ``source``, in path order."""
    fs, root = storage.filesystem(source) if storage.is_uri(source) else _local_fs(source)
    if not retry.call(lambda: fs.exists(root), f"Checking {source}"):
        raise BatchInputError(f"{source} does not exist. Check the path or URI (and the credentials).")
    if retry.call(lambda: fs.isfile(root), f"Checking {source}"):
        return [(item_id_from_path(posixpath.basename(root)), source)] if _is_image_file(root) else []
    paths = retry.call(lambda: fs.find(root), f"Listing {source}")
    relative = [_relative(str(p), root) for p in sorted(paths)]
    excluded = _relative(_path_in(fs, output), root) if _same_fs(source, output) else None
    found = list(_items_in(relative, excluded))
    if "" in found and len(found) > 1:
        # Loose files beside other items (a README, a LICENSE) are not a series.
        log.info("Ignoring the files directly in %s: they sit beside other inputs.", source)
        found.remove("")
    # DICOM files right under an otherwise empty prefix make it one series, named after it.
    top_name = storage.base_name(root)
    return [(item_id_from_path(rel or top_name), _location(source, rel)) for rel in found]


def _items_in(relative: Iterable[str], excluded: str | None) -> Iterator[str]:
    """Relative paths of the items among the relative paths of a listing."""
    series: set[str] = set()
    for rel in relative:
        if excluded and (rel == excluded or rel.startswith(excluded + "/")):
            continue  # the job's own output under its input prefix
        if _is_image_file(rel):
            yield rel
        elif _looks_like_dicom(rel):
            folder = posixpath.dirname(rel)
            if folder not in series:
                series.add(folder)
                yield folder


def _is_image_file(path: str) -> bool:
    return path.lower().endswith((*_NIFTI_SUFFIXES, _ZIP_SUFFIX))


def _looks_like_dicom(path: str) -> bool:
    name = posixpath.basename(path)
    if name.startswith("."):
        return False
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        return True
    return suffix.lower() in _DICOM_SUFFIXES or suffix.isdigit()


def _local_fs(path: str) -> tuple[Any, str]:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), str(storage.local_path(path).resolve())


def _path_in(fs: Any, location: str) -> str:
    if storage.is_uri(location):
        return str(storage.filesystem(location)[1])
    return str(storage.local_path(location).resolve())


def _same_fs(a: str, b: str) -> bool:
    return a.split("://", 1)[0] == b.split("://", 1)[0] if storage.is_uri(a) else not storage.is_uri(b)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def _location(base: str, relative: str) -> str:
    """``relative`` (a path below the prefix) as a location, in the prefix's own spelling."""
    if relative == "":
        return base
    return storage.join(base, relative)


# --- DICOMweb ------------------------------------------------------------------------


def _dicomweb_items(source: str, output: str, retry: RetryPolicy) -> list[WorkItem]:
    """One item per series of a DICOMweb study or search, named by its Series Instance UID."""
    found = retry.call(lambda: dicomweb.find_series(source), f"Searching {source}")
    if not found:
        raise BatchInputError(f"{source} names no series. Check the study UID or the search filters.")
    ids = [uri.rsplit("/", 1)[1] for uri in found]
    return [
        WorkItem(item_id, uri, storage.join(output, item_id)) for item_id, uri in zip(ids, found, strict=True)
    ]


# --- manifests -----------------------------------------------------------------------


def _manifest_items(manifest: str, output: str, retry: RetryPolicy) -> Iterator[WorkItem]:
    data = retry.call(lambda: storage.read_bytes(manifest), f"Reading {manifest}")
    base = _parent(manifest)
    for number, row in enumerate(_manifest_rows(manifest, data), start=1):
        where = f"{manifest}, row {number}"
        source = _text(row.get("input_uri"))
        if not source:
            raise BatchInputError(f"{where}: input_uri is empty. Every row needs the input's location.")
        source = _resolve(base, source)
        given_id = _text(row.get("id"))
        item_id = check_item_id(given_id, where) if given_id else item_id_from_path(storage.base_name(source))
        out = _text(row.get("output"))
        item_output = _resolve(output, out) if out else storage.join(output, item_id)
        yield WorkItem(item_id, source, item_output, _text(row.get("task")) or None)


def _manifest_rows(manifest: str, data: bytes) -> list[dict[str, Any]]:
    lower = manifest.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq  # type: ignore[import-untyped]

            rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(data)).to_pylist()
        elif lower.endswith(".csv"):
            import csv

            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
        else:
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except Exception as exc:
        raise BatchInputError(f"Cannot parse the manifest {manifest}: {exc}") from exc
    _check_columns(manifest, rows)
    return rows


def _check_columns(manifest: str, rows: list[dict[str, Any]]) -> None:
    if any(not isinstance(row, dict) for row in rows):
        raise BatchInputError(f"{manifest}: every JSON line must be an object with an input_uri.")
    columns = set().union(*(row.keys() for row in rows)) if rows else set()
    if rows and "input_uri" not in columns:
        raise BatchInputError(
            f"{manifest} has no input_uri column (columns: {', '.join(sorted(map(str, columns)))}). "
            f"A manifest has the columns {', '.join(_MANIFEST_COLUMNS)}; only input_uri is required."
        )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if "/" in location else "."


def _resolve(base: str, location: str) -> str:
    """``location`` as given when absolute (a URI or ``/path``), else below ``base``."""
    if "://" in location or location.startswith("/"):
        return location
    return storage.join(base, location)
