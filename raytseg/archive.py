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


def check_members(infos: list[zipfile.ZipInfo], max_bytes: int, name: str, advice: str) -> None:
    """Refuse the archive if any member is unsafe or the declared sizes pass ``max_bytes``."""
    for info in infos:
        member_parts(info, name, advice)
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise UnsafeArchiveError(
            f"{name} expands to {declared} bytes, more than the limit of {max_bytes}. {advice}"
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
