"""Zip archives from outside: one set of member checks for every reader.

Two kinds of zip come from users or the network: DICOM series (read into memory by the
load stage) and model weights (extracted to disk; their checkpoints are pickles). Both
get the same checks before any member is read: no absolute names, drive letters or
colons, no ``..``, no symbolic links, and no more declared bytes than the limit. The
declared sizes may lie, so every read also counts the bytes it really gets
(``ByteBudget``). A refusal is an ``UnsafeArchiveError``; ``advice`` tells the caller's
user what to do about it.
"""

from __future__ import annotations

import re
import stat
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

from raytseg.errors import UnsafeArchiveError

_CHUNK_BYTES = 1 << 20


class ByteBudget:
    """Counts bytes as they are read and stops the read when the limit is passed."""

    def __init__(self, limit: int, name: str, advice: str) -> None:
        self.left = limit
        self.name = name
        self.advice = advice

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise UnsafeArchiveError(f"{self.name} expands past the limit of the archive size. {self.advice}")


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold, checked on its directory before any member is read."""

    total_bytes: int  # all members, expanded
    member_bytes: int | None = None  # one member, expanded (None: only the total)
    members: int = 100_000  # a whole-body CT has a few thousand slices
    ratio: float | None = None  # expanded / compressed, for members past RATIO_MIN_BYTES


RATIO_MIN_BYTES = 1 << 20  # small members (JSON, a DICOM header) may compress very well


def check_members(infos: list[zipfile.ZipInfo], limits: ArchiveLimits, name: str, advice: str) -> None:
    """Refuse the archive if a member is unsafe or the directory passes ``limits``.

    The directory's sizes are checked before anything is allocated; that they may lie is
    ``ByteBudget``'s and zipfile's concern (zipfile reads no byte past a declared size).
    """
    if len(infos) > limits.members:
        raise UnsafeArchiveError(f"{name} holds {len(infos)} members, more than {limits.members}. {advice}")
    for info in infos:
        member_parts(info, name, advice)
        _check_size(info, limits, name, advice)
    declared = sum(info.file_size for info in infos)
    if declared > limits.total_bytes:
        raise UnsafeArchiveError(
            f"{name} expands to {declared} bytes, more than the limit of {limits.total_bytes}. {advice}"
        )


def _check_size(info: zipfile.ZipInfo, limits: ArchiveLimits, name: str, advice: str) -> None:
    size = info.file_size
    if limits.member_bytes is not None and size > limits.member_bytes:
        raise UnsafeArchiveError(
            f"{name} holds {info.filename!r} of {size} bytes, more than any image within the "
            f"limits needs ({limits.member_bytes}). {advice}"
        )
    if (
        limits.ratio is not None
        and size > RATIO_MIN_BYTES
        and size > limits.ratio * max(info.compress_size, 1)
    ):
        raise UnsafeArchiveError(
            f"{name} holds {info.filename!r}, which expands {size // max(info.compress_size, 1)}-fold; "
            f"image data does not compress past {limits.ratio:.0f}:1. {advice}"
        )


def member_parts(info: zipfile.ZipInfo, name: str, advice: str) -> list[str]:
    """The member's path as safe relative parts, or ``UnsafeArchiveError``."""
    parts = [p for p in re.split(r"[\\/]", info.filename) if p not in ("", ".")]
    reason = _unsafe_reason(info, parts)
    if reason:
        raise UnsafeArchiveError(
            f"{name} holds {info.filename!r}, which {reason}; refusing to extract it. {advice}"
        )
    return parts


def _unsafe_reason(info: zipfile.ZipInfo, parts: list[str]) -> str | None:
    path = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return "has an absolute path"
    # Elsewhere a colon names an NTFS alternate data stream; no genuine member needs one.
    if ":" in path:
        return "has a ':' in its name"
    if ".." in parts:
        return "climbs out of the archive ('..')"
    if not parts:
        return "has no name"
    return None


def copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, out: BinaryIO, budget: ByteBudget) -> None:
    """Write one member's bytes to ``out``, counting every chunk against ``budget``."""
    with archive.open(info) as member:
        while chunk := member.read(_CHUNK_BYTES):
            budget.take(len(chunk))
            out.write(chunk)
