"""Error tree -> HTTP: status, body and headers, Ray's wrappers unwrapped (no Ray cluster)."""

from __future__ import annotations

import asyncio

import pytest

from raytseg import errors
from raytseg.errors import (
    InternalError,
    JobNotFoundError,
    NotDeployedError,
    ReplicaUnavailableError,
    UnauthorizedError,
    UriNotAllowedError,
)
from raytseg.serve.errors import as_raytseg_error, http_error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.UnreadableImageError("x"), 400),
        (errors.UnsafeArchiveError("x"), 400),
        (errors.InvalidImageError("x"), 422),
        (errors.AmbiguousDicomError("x"), 422),
        (errors.ImageTooLargeError("x"), 413),
        (errors.UnknownTaskError("x"), 404),
        (errors.UnknownClassError("x"), 422),
        (errors.InvalidOptionError("x"), 422),
        (errors.LicenseError("x"), 403),
        (errors.MissingWeightsError("x"), 503),
        (errors.StorageError("x"), 502),
        (errors.StorageUnavailableError("x"), 503),
        (errors.IdempotencyConflictError("x"), 409),
        (errors.ModelError("x"), 500),
        (errors.OverloadedError("x"), 503),
        (errors.RequestTimeoutError("x"), 504),
        (UnauthorizedError("x"), 401),
        (UriNotAllowedError("x"), 403),
        (JobNotFoundError("x"), 404),
        (NotDeployedError("x"), 422),
        (ReplicaUnavailableError("x"), 503),
        (InternalError("x"), 500),
    ],
)
def test_status_and_body(error: errors.RaytsegError, status: int) -> None:
    answer = http_error(error)
    assert answer.status == status
    assert answer.body == {"error": {"type": type(error).__name__, "message": "x", "status": status}}


def test_overload_answers_as_configured_with_retry_after() -> None:
    answer = http_error(errors.OverloadedError("busy"), overload_status=429, retry_after_s=7)
    assert answer.status == 429
    assert answer.body["error"]["status"] == 429
    assert answer.headers == {"Retry-After": "7"}
    assert http_error(ReplicaUnavailableError("gone")).headers["Retry-After"] == "30"
    assert http_error(errors.StorageUnavailableError("no answer")).headers["Retry-After"] == "30"
    assert "Retry-After" not in http_error(errors.StorageError("denied")).headers
    assert "Retry-After" not in http_error(errors.MissingWeightsError("no")).headers


def test_unauthorized_names_the_scheme() -> None:
    assert http_error(UnauthorizedError("no")).headers["WWW-Authenticate"].startswith("Bearer")


def test_ray_task_error_is_unwrapped() -> None:
    from ray.exceptions import RayTaskError

    cause = errors.UnreadableImageError("not a NIfTI")
    wrapped = RayTaskError("load", "traceback", cause).as_instanceof_cause()
    twice = RayTaskError("finish", "traceback", wrapped).as_instanceof_cause()
    for exc in (wrapped, twice):
        error = as_raytseg_error(exc)
        assert type(error) is errors.UnreadableImageError
        assert error.message == "not a NIfTI"


def test_serve_and_ray_failures_are_translated() -> None:
    from ray.exceptions import ActorDiedError, OwnerDiedError
    from ray.serve.exceptions import BackPressureError

    backpressure = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    assert isinstance(as_raytseg_error(backpressure), errors.OverloadedError)
    assert isinstance(as_raytseg_error(ActorDiedError()), ReplicaUnavailableError)
    assert isinstance(as_raytseg_error(OwnerDiedError("00" * 28, "", "")), ReplicaUnavailableError)
    assert isinstance(as_raytseg_error(asyncio.TimeoutError()), errors.RequestTimeoutError)


def test_upstream_replica_death_is_found_in_the_chain() -> None:
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import RayServeException

    died = RayTaskError("finish", "traceback", ActorDiedError()).as_instanceof_cause()
    upstream = RayServeException("Request to deployment 'Postprocess' failed")
    upstream.__cause__ = died
    assert isinstance(as_raytseg_error(upstream), ReplicaUnavailableError)


def test_unexpected_errors_hide_their_text() -> None:
    error = as_raytseg_error(KeyError("/secret/path/patient-123"))
    assert isinstance(error, InternalError)
    assert "patient" not in error.message
    assert error.status_code == 500


def test_errors_pickle_across_processes() -> None:
    import pickle

    for error in (UnauthorizedError("a"), NotDeployedError("b"), ReplicaUnavailableError("c")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert back.message == error.message
