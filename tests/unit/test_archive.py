"""Zip member checks shared by DICOM uploads and weight archives."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest

from raytseg.archive import ArchiveLimits, ByteBudget, check_members, copy_member, member_parts
from raytseg.errors import InputError, UnsafeArchiveError

ADVICE = "Do this instead."


def _info(name: str, *, link: bool = False, size: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.file_size = size
    if link:
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("info", "phrase"),
    [
        (_info("/etc/slice.dcm"), "absolute path"),
        (_info("\\etc\\slice.dcm"), "absolute path"),
        (_info("C:/slice.dcm"), "absolute path"),
        (_info("a/b:stream"), "':' in its name"),
        (_info("a/../../slice.dcm"), r"climbs out of the archive \('\.\.'\)"),
        (_info("a\\..\\slice.dcm"), r"'\.\.'"),
        (_info("./"), "has no name"),
        (_info("a/link", link=True), "symbolic link"),
    ],
    ids=["absolute", "backslash-absolute", "drive", "colon", "dotdot", "backslash-dotdot", "dot", "symlink"],
)
def test_unsafe_members_are_refused(info: zipfile.ZipInfo, phrase: str) -> None:
    with pytest.raises(UnsafeArchiveError, match=phrase) as raised:
        check_members([_info("fine.dcm"), info], ArchiveLimits(10**6), "upload.zip", ADVICE)
    assert "upload.zip holds" in str(raised.value)
    assert "refusing to extract it. Do this instead." in str(raised.value)
    # A refused archive is the sender's fault: the service answers 400.
    assert isinstance(raised.value, InputError)
    assert raised.value.status_code == 400


def test_safe_member_parts() -> None:
    assert member_parts(_info("series/./a\\b.dcm"), "upload.zip", ADVICE) == ["series", "a", "b.dcm"]


def test_declared_size_limit() -> None:
    infos = [_info("a.dcm", size=3000), _info("b.dcm", size=3000)]
    check_members(infos, ArchiveLimits(6000), "upload.zip", ADVICE)
    with pytest.raises(
        UnsafeArchiveError, match="upload.zip expands to 6000 bytes, more than the limit of 5999"
    ):
        check_members(infos, ArchiveLimits(5999), "upload.zip", ADVICE)


def test_byte_budget_stops_the_read() -> None:
    budget = ByteBudget(100, "upload.zip", ADVICE)
    budget.take(60)
    budget.take(40)
    with pytest.raises(UnsafeArchiveError, match="upload.zip expands past the limit.*Do this instead"):
        budget.take(1)


def test_copy_member_counts_real_bytes() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", b"\x00" * 5000)
    with zipfile.ZipFile(buffer) as archive:
        out = io.BytesIO()
        copy_member(archive, archive.getinfo("a.dcm"), out, ByteBudget(5000, "upload.zip", ADVICE))
        assert out.getvalue() == b"\x00" * 5000
        with pytest.raises(UnsafeArchiveError, match="expands past the limit"):
            copy_member(
                archive, archive.getinfo("a.dcm"), io.BytesIO(), ByteBudget(4999, "upload.zip", ADVICE)
            )


def _packed(name: str, size: int, compressed: int) -> zipfile.ZipInfo:
    info = _info(name, size=size)
    info.compress_size = compressed
    return info


def test_a_member_larger_than_any_allowed_image_is_refused_before_reading() -> None:
    limits = ArchiveLimits(10**9, member_bytes=10**6)
    check_members([_packed("slice.dcm", 10**6, 10**6)], limits, "upload.zip", ADVICE)
    with pytest.raises(UnsafeArchiveError, match=r"'huge.dcm' of 1000001 bytes, more than .*\(1000000\)"):
        check_members([_packed("huge.dcm", 10**6 + 1, 10**6)], limits, "upload.zip", ADVICE)


def test_a_member_compressed_past_the_ratio_is_refused() -> None:
    limits = ArchiveLimits(10**12, ratio=200.0)
    check_members([_packed("small.json", 10**6, 1)], limits, "upload.zip", ADVICE)  # under RATIO_MIN_BYTES
    check_members([_packed("slice.dcm", 2 * 10**6, 10**4)], limits, "upload.zip", ADVICE)  # exactly 200:1
    with pytest.raises(UnsafeArchiveError, match="expands 1000-fold.*200:1"):
        check_members([_packed("zeros.dcm", 3 * 10**9, 3 * 10**6)], limits, "upload.zip", ADVICE)


def test_too_many_members_are_refused() -> None:
    infos = [_info(f"s{i}.dcm") for i in range(11)]
    check_members(infos[:10], ArchiveLimits(10**6, members=10), "upload.zip", ADVICE)
    with pytest.raises(UnsafeArchiveError, match="11 members, more than 10"):
        check_members(infos, ArchiveLimits(10**6, members=10), "upload.zip", ADVICE)
