"""Safe zip extraction and checksums of known published files.

Weight archives come from the network or from users, and checkpoints inside them are
pickles, so an archive may neither write outside its folder (absolute names, ``..``,
symbolic links) nor expand past ``Settings.max_archive_bytes``: ``raytseg.archive``
checks both, as it does for DICOM zips.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
import zlib
from pathlib import Path

from raytseg.archive import ArchiveLimits, ByteBudget, check_members, copy_member, member_parts
from raytseg.errors import WeightsIntegrityError

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_DATASET_NAME = re.compile(r"^Dataset(\d{3,})_")
# Written by raytseg.weights.synth into every model folder of random weights.
SYNTHETIC_MARKER = "RAYTSEG_SYNTHETIC_WEIGHTS.txt"
_ADVICE = (
    "Nothing was installed; use the published archive, or raise RAYTSEG_MAX_ARCHIVE_BYTES if it is larger."
)

# SHA-256 of files inside published zips, by dataset id and path inside the dataset folder.
# Verified after extraction, before the folder becomes visible in the store.
KNOWN_SHA256: dict[int, dict[str, str]] = {
    297: {
        "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth": (
            "1e38e40356adc2706a662e365405a97f862d62a7da65f6bf81d025aee1b979ac"
        ),
        "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/plans.json": (
            "d1cb3c15f53dc36fdb618e0f9082573d1f50b74a9b5fa73094ac8680845839f1"
        ),
    },
}


def dataset_id_of(name: str) -> int | None:
    """The id in a ``DatasetNNN_name`` folder name, or None for other names."""
    match = _DATASET_NAME.match(name)
    return int(match.group(1)) if match else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_known_checksums(dataset_folder: Path, dataset_id: int, *, allow_synthetic: bool = False) -> None:
    """Compare files of a freshly extracted dataset folder with ``KNOWN_SHA256``.

    With ``allow_synthetic``, model folders marked as raytseg's random weights are not
    compared (they replace the published files on purpose, in test setups); downloads
    from the release URLs never allow that.
    """
    for relative, expected in KNOWN_SHA256.get(dataset_id, {}).items():
        path = dataset_folder / relative
        marker = dataset_folder / relative.split("/")[0] / SYNTHETIC_MARKER
        if allow_synthetic and marker.is_file():
            logger.warning("%s holds synthetic random weights; not checking its checksums", marker.parent)
            continue
        if not path.is_file():
            raise WeightsIntegrityError(
                f"The archive for dataset {dataset_id} lacks {relative}; it is not the published "
                "TotalSegmentator release. Download it again with `raytseg weights download`."
            )
        actual = sha256_file(path)
        if actual != expected:
            raise WeightsIntegrityError(
                f"Checksum mismatch for {dataset_folder.name}/{relative}: expected SHA-256 {expected}, "
                f"got {actual}. The download is corrupt or not the published file; nothing was installed. "
                "Retry `raytseg weights download`."
            )


def safe_extract(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract ``archive`` into ``dest``, refusing what ``raytseg.archive`` refuses."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            check_members(members, ArchiveLimits(max_bytes), archive.name, _ADVICE)
            dest.mkdir(parents=True, exist_ok=True)
            budget = ByteBudget(max_bytes, archive.name, _ADVICE)
            for info in members:
                _extract_member(zf, info, dest, budget)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise WeightsIntegrityError(
            f"{archive.name} is not a valid zip archive ({exc}). Download it again."
        ) from exc


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, budget: ByteBudget) -> None:
    target = dest.joinpath(*member_parts(info, Path(str(zf.filename)).name, _ADVICE))
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        copy_member(zf, info, out, budget)


def rename_into_place(source: Path, target: Path) -> None:
    """Rename; losing a race to another process that put ``target`` in place is fine."""
    try:
        os.rename(source, target)
    except OSError:
        if not target.exists():
            raise
        logger.debug("%s appeared meanwhile; keeping it", target)


def weights_top(extracted: Path) -> Path:
    """The folder holding the ``DatasetNNN_*`` folders: the top, or its only sub-folder."""
    children = [p for p in extracted.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if any(dataset_id_of(p.name) is not None for p in children):
        return extracted
    if len(children) == 1 and children[0].is_dir():
        return children[0]
    raise WeightsIntegrityError("The weights archive holds no DatasetNNN_* folder at its top level.")
