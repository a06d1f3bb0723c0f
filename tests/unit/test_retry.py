"""Transient storage errors are retried with backoff; permanent ones are not."""

from __future__ import annotations

import errno

import pytest

from raytseg import retry as retry_module
from raytseg.errors import StorageError, UnreadableImageError
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
