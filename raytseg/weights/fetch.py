"""Download TotalSegmentator's weights and import local weight zips.

Public models come from TotalSegmentator's GitHub releases
(``<weights_base_url>/<release>/<DatasetNNN_name>.zip``), licensed ones from its license
server (``POST <license_server>/download_weights``), exactly as TotalSegmentator 2.18 asks
for them. Each download is streamed to a temporary file under the store root, extracted
safely into a temporary folder, checked against ``KNOWN_SHA256``, and only then renamed
into place: a failure leaves nothing behind, and a reader never sees half a model.

Folders already in the store are never deleted or overwritten. TotalSegmentator deletes
obsolete folders; raytseg refuses to install a second folder with the same dataset id
instead, because nnU-Net cannot tell them apart.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import urllib.error
from pathlib import Path

from raytseg.config import Settings
from raytseg.errors import LicenseError, MissingWeightsError, StorageError, WeightsIntegrityError
from raytseg.tasks.registry import DatasetSpec, load_catalog
from raytseg.weights import _archive, _http
from raytseg.weights._archive import KNOWN_SHA256
from raytseg.weights.license import LICENSE_URL, SET_LICENSE_COMMAND, read_license
from raytseg.weights.store import datasets_for_task, find_dataset_folders, how_to_get

__all__ = ["KNOWN_SHA256", "download_dataset", "download_task", "import_zip", "totalseg_version"]

logger = logging.getLogger(__name__)


def totalseg_version() -> str:
    """The TotalSegmentator version the catalogue (and the license server request) follows."""
    return load_catalog().generated_from.split()[-1]


def download_dataset(
    store_root: Path, dataset_id: int, settings: Settings, *, license_key: str | None
) -> Path:
    """Download one dataset's zip and install its folder into ``store_root``.

    Parts already present in the store are kept as they are; only what is missing is added.

    Args:
        store_root: the weights folder (nnU-Net results layout).
        dataset_id: e.g. 297.
        settings: download URLs and the archive size limit.
        license_key: needed for licensed datasets only.

    Returns:
        The installed ``<store_root>/DatasetNNN_name`` folder.

    Raises:
        MissingWeightsError: TotalSegmentator does not publish the dataset.
        LicenseError: licensed dataset without a key, or the server refuses the key.
        StorageError: the download failed (network, HTTP status, disk).
        WeightsIntegrityError: corrupt archive, unexpected content, checksum mismatch, or a
            different folder with the same id already in the store.
        UnsafeArchiveError: the archive escapes its folder or exceeds the size limit.

    Example:
        >>> settings = Settings.from_env()  # doctest: +SKIP
        >>> download_dataset(settings.weights_dir, 297, settings, license_key=None)  # doctest: +SKIP
    """
    dataset = _published(dataset_id)
    store_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".raytseg-download-", dir=store_root))
    try:
        archive = work / f"{dataset.folder}.zip"
        _download_archive(dataset_id, dataset, settings, license_key, archive)
        installed = _install_archive(archive, work / "extracted", store_root, settings, only=dataset_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return installed[0]


def download_task(
    task: str,
    settings: Settings,
    *,
    fast: bool = False,
    fastest: bool = False,
    license_key: str | None = None,
) -> list[Path]:
    """Download every dataset a task needs (crop models included) into ``settings.weights_dir``.

    Datasets with a folder already in place are skipped. Without ``license_key`` the key
    stored by ``raytseg set-license`` is used for licensed datasets.

    Returns:
        The dataset folders, in ``datasets_for_task`` order.
    """
    root = settings.weights_dir
    if settings.weights_uri is not None:
        logger.warning("weights_uri is set; downloading into the local weights folder %s", root)
    folders = []
    for dataset_id in datasets_for_task(task, fast=fast, fastest=fastest):
        present = find_dataset_folders(root, dataset_id)
        if present:
            logger.info("Dataset %s already present: %s", dataset_id, present[0])
            folders.append(present[0])
            continue
        key = license_key or read_license(settings)
        folders.append(download_dataset(root, dataset_id, settings, license_key=key))
    return folders


def import_zip(zip_path: Path, store_root: Path, settings: Settings) -> list[Path]:
    """Install the ``DatasetNNN_*`` folders of a local zip (TotalSegmentator's ``totalseg_import_weights``).

    Returns:
        The installed dataset folders.

    Raises:
        StorageError: the zip does not exist.
        WeightsIntegrityError, UnsafeArchiveError: as for ``download_dataset``.
    """
    if not zip_path.is_file():
        raise StorageError(f"{zip_path} does not exist or is not a file.")
    store_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".raytseg-import-", dir=store_root))
    try:
        return _install_archive(zip_path, work / "extracted", store_root, settings, only=None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _published(dataset_id: int) -> DatasetSpec:
    dataset = load_catalog().datasets.get(dataset_id)
    if dataset is None or not dataset.downloadable:
        raise MissingWeightsError(
            f"Dataset {dataset_id} is not published by TotalSegmentator and cannot be downloaded. "
            f"{how_to_get(dataset_id)}"
        )
    return dataset


def _download_archive(
    dataset_id: int, dataset: DatasetSpec, settings: Settings, license_key: str | None, dest: Path
) -> None:
    if dataset.release is not None:
        url = f"{settings.weights_base_url.rstrip('/')}/{dataset.release}/{dataset.folder}.zip"
        body = None
    else:
        if not license_key:
            raise LicenseError(
                f"{dataset.folder} is licensed: get a license at {LICENSE_URL}, then run "
                f"`{SET_LICENSE_COMMAND}` and download again."
            )
        url = f"{settings.license_server.rstrip('/')}/download_weights"
        body = {"license_number": license_key, "task": dataset.license_task, "version": totalseg_version()}
    logger.info("Downloading dataset %s from %s", dataset_id, url)
    try:
        _http.download(url, dest, json_body=body, max_bytes=settings.max_archive_bytes)
    except urllib.error.HTTPError as exc:
        raise _http_failure(exc, url, licensed=body is not None) from exc


def _http_failure(exc: urllib.error.HTTPError, url: str, *, licensed: bool) -> Exception:
    detail = _http.error_detail(exc)
    if licensed and (exc.code in (401, 403) or "invalid_license" in detail):
        return LicenseError(
            f"The license server refused the license key (HTTP {exc.code}: {detail}). Check the key, set it "
            f"with `{SET_LICENSE_COMMAND}`, or get one at {LICENSE_URL}."
        )
    hint = " The weights are not at that address; check RAYTSEG_WEIGHTS_URL." if exc.code == 404 else ""
    return StorageError(f"Download of {url} failed: HTTP {exc.code} {exc.reason}. {detail}{hint}".rstrip())


def _install_archive(
    archive: Path, extract_dir: Path, store_root: Path, settings: Settings, *, only: int | None
) -> list[Path]:
    """Extract, check, then rename the archive's dataset folders into the store.

    ``only``: a download, which must hold that dataset (others are ignored) and must match
    the published checksums. Without it, an import: every dataset folder is installed,
    and folders marked as synthetic weights skip the checksums.
    """
    _archive.safe_extract(archive, extract_dir, settings.max_archive_bytes)
    found = _dataset_folders(_archive.weights_top(extract_dir))
    if only is not None:
        if only not in found:
            raise WeightsIntegrityError(
                f"{archive.name} holds no Dataset{only:03d}_* folder (it holds: "
                f"{', '.join(p.name for p in found.values()) or 'nothing usable'})."
            )
        found = {only: found[only]}
    for dataset_id, folder in found.items():
        _archive.verify_known_checksums(folder, dataset_id, allow_synthetic=only is None)
        _refuse_second_folder(store_root, dataset_id, folder.name)
    return [_install(folder, store_root) for folder in found.values()]


def _dataset_folders(top: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in sorted(top.iterdir()):
        dataset_id = _archive.dataset_id_of(child.name)
        if dataset_id is None or not child.is_dir():
            continue
        if dataset_id in found:
            raise WeightsIntegrityError(
                f"The archive holds two folders for dataset {dataset_id}: "
                f"{found[dataset_id].name}, {child.name}."
            )
        found[dataset_id] = child
    return found


def _refuse_second_folder(store_root: Path, dataset_id: int, name: str) -> None:
    others = [p.name for p in find_dataset_folders(store_root, dataset_id) if p.name != name]
    if others:
        raise WeightsIntegrityError(
            f"{store_root} already holds {', '.join(others)} for dataset {dataset_id}; installing {name} too "
            "would make the id ambiguous for nnU-Net. Move the old folder elsewhere first (raytseg never "
            "deletes weights folders)."
        )


def _install(folder: Path, store_root: Path) -> Path:
    """Rename ``folder`` into the store; merge into an existing one without overwriting."""
    target = store_root / folder.name
    if not target.exists():
        _archive.rename_into_place(folder, target)
        logger.info("Installed %s", target)
        return target
    for child in sorted(folder.iterdir()):
        if (target / child.name).exists():
            logger.info("Keeping the existing %s", target / child.name)
            continue
        _archive.rename_into_place(child, target / child.name)
        logger.info("Installed %s", target / child.name)
    return target
