"""Transient storage errors are retried with backoff; permanent ones are not."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from raytseg import retry as retry_module
from raytseg import storage
from raytseg.errors import StorageError, StorageUnavailableError, UnreadableImageError
from raytseg.retry import RetryPolicy, is_transient


class Flaky:
    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(retry_module.time, "sleep", slept.append)
    return slept


def wrapped(cause: BaseException) -> StorageError:
    try:
        raise StorageError("Could not read s3://b/k") from cause
    except StorageError as exc:
        return exc


def test_transient_errors_are_retried_with_growing_delays(sleeps: list[float]) -> None:
    reset = ConnectionResetError(errno.ECONNRESET, "reset by peer")
    flaky = Flaky(OSError("503 SlowDown"), reset, wrapped(TimeoutError("read timed out")))
    assert RetryPolicy(retries=3, delay_s=1.0).call(flaky, "Reading") == "done"
    assert flaky.calls == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        assert 0.75 * 2**attempt <= delay <= 1.25 * 2**attempt


def test_the_last_error_is_raised_when_retries_run_out(sleeps: list[float]) -> None:
    flaky = Flaky(OSError("1"), OSError("2"), OSError("3"))
    with pytest.raises(OSError, match="3"):
        RetryPolicy(retries=2, delay_s=0.01).call(flaky, "Reading")
    assert flaky.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("no such key"),
        PermissionError("access denied"),
        UnreadableImageError("not a NIfTI file"),
        wrapped(FileNotFoundError("no such key")),
        ValueError("a bug, not the network"),
    ],
)
def test_permanent_errors_are_raised_at_once(error: BaseException, sleeps: list[float]) -> None:
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        RetryPolicy(retries=5).call(flaky, "Reading")
    assert (flaky.calls, sleeps) == (1, [])
    assert not is_transient(error)


def test_an_object_store_that_does_not_answer_is_unavailable_and_transient(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """s3fs raises botocore's own connection errors (no OSError): they count as transient,
    and raytseg's storage functions raise them as ``StorageUnavailableError`` (503)."""
    s3fs = pytest.importorskip("s3fs")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_MAX_ATTEMPTS": "1",  # botocore's own retries would only make this slower
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageUnavailableError, match="did not answer") as read:
            storage.read_bytes("s3://bucket/ct.nii.gz")
        with pytest.raises(StorageUnavailableError):
            storage.write_bytes("s3://bucket/out.nii.gz", b"data")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert type(read.value.__cause__).__module__.startswith("botocore")
    assert is_transient(read.value.__cause__)
    assert is_transient(StorageUnavailableError("the storage did not answer"))
    assert read.value.status_code == 503


def test_a_refused_object_store_request_is_a_plain_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StorageError) as info:
        storage.write_bytes(str(blocker / "out.nii.gz"), b"data")
    assert not isinstance(info.value, StorageUnavailableError)
