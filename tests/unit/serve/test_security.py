"""Bearer tokens and the job URI allow-list."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raytseg.errors import InvalidOptionError, UnauthorizedError, UriNotAllowedError
from raytseg.serve.config import AuthSpec
from raytseg.serve.security import UriPolicy, check_bearer, load_tokens

TOKEN_A = "a" * 24
TOKEN_B = "b-token-from-the-file-0001"


def test_tokens_from_env_and_file(tmp_path: Path) -> None:
    secret = tmp_path / "tokens"
    secret.write_text(f"# rotated 2026-01\n{TOKEN_B}\n\n")
    auth = AuthSpec(token_file=secret)
    tokens = load_tokens(auth, {"RAYTSEG_API_TOKENS": f" {TOKEN_A} , "})
    assert tokens == (TOKEN_A.encode(), TOKEN_B.encode())


def test_token_problems_never_show_the_token(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="at least 16") as info:
        load_tokens(AuthSpec(), {"RAYTSEG_API_TOKENS": "short-secret"})
    assert "short-secret" not in str(info.value)
    with pytest.raises(InvalidOptionError, match="no token was found"):
        load_tokens(AuthSpec(required=True), {})
    with pytest.raises(InvalidOptionError, match="Cannot read the token file"):
        load_tokens(AuthSpec(token_file=tmp_path / "missing"), {})


def test_bearer_check() -> None:
    tokens = (TOKEN_A.encode(), TOKEN_B.encode())
    check_bearer(f"Bearer {TOKEN_B}", tokens)
    check_bearer(f"bearer {TOKEN_A}", tokens)
    check_bearer(None, ())  # no tokens configured: open
    for header in (None, "", "Bearer", f"Basic {TOKEN_A}", f"Bearer {TOKEN_A}x", "Bearer " + "a" * 23):
        with pytest.raises(UnauthorizedError):
            check_bearer(header, tokens)


@pytest.fixture
def policy(tmp_path: Path) -> UriPolicy:
    (tmp_path / "in").mkdir()
    return UriPolicy(("s3://bucket/in/", "memory://jobs", str(tmp_path / "in")))


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("s3://bucket/in/ct.nii.gz", "s3://bucket/in/ct.nii.gz"),
        ("s3://bucket/in/a/b/", "s3://bucket/in/a/b/"),
        ("memory://jobs/x", "memory://jobs/x"),
        ("S3://bucket/in/ct.nii.gz", "s3://bucket/in/ct.nii.gz"),  # the scheme is case-insensitive
    ],
)
def test_allowed(policy: UriPolicy, uri: str, normal: str) -> None:
    assert policy.check(uri, "input_uri") == normal  # the location itself, not its prefix


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/input/ct.nii.gz",  # look-alike prefix
        "s3://bucket/in/../secret/ct.nii.gz",
        "s3://bucket/in/./ct.nii.gz",
        "s3://bucket/in//ct.nii.gz",
        "s3://other/in/ct.nii.gz",
        "gs://bucket/in/ct.nii.gz",
        "memory://jobsx/a",
        "https://bucket/in/ct.nii.gz",
        "s3://bucket/in/ct.nii.gz?versionId=1",
        # Presigned URLs (their signature is a query): to another bucket, or to the allowed
        # one spelled as https, whose path the allow-list cannot vouch for.
        "https://other.s3.amazonaws.com/in/ct.nii.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=0f",
        "https://bucket.s3.amazonaws.com/in/ct.nii.gz?X-Amz-Signature=0f",
        "s3://bucket/in/ct.nii.gz?X-Amz-Signature=0f",
        "s3://bucket/in/ct\\..\\x",
        "s3://bucket/in/%2e%2e/secret/ct.nii.gz",  # a server that decodes it would go up
        "s3://bucket/in/%2E%2E%2Fsecret",
        "s3://bucket/in/..%2fsecret",
        "s3://bucket/in/%5c..%5csecret",
        "relative/path.nii.gz",
        "",
    ],
)
def test_refused(policy: UriPolicy, uri: str) -> None:
    with pytest.raises(UriNotAllowedError):
        policy.check(uri, "input_uri")


def test_local_paths_are_resolved(policy: UriPolicy, tmp_path: Path) -> None:
    inside = tmp_path / "in" / "ct.nii.gz"
    assert policy.check(str(inside), "input_uri") == os.path.realpath(inside)
    assert policy.check(f"file://{inside}", "input_uri") == os.path.realpath(inside)
    for outside in (f"{tmp_path}/in/../etc/passwd", "/etc/passwd", f"file://{tmp_path}/inx/a"):
        with pytest.raises(UriNotAllowedError):
            policy.check(outside, "input_uri")
    (tmp_path / "in" / "link").symlink_to("/etc")
    with pytest.raises(UriNotAllowedError):
        policy.check(str(tmp_path / "in" / "link" / "passwd"), "input_uri")


def test_nothing_allowed_by_default() -> None:
    with pytest.raises(UriNotAllowedError, match="none are configured"):
        UriPolicy(()).check("memory://x/y", "output_uri")
