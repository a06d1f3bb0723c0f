"""The one place where the service's errors become HTTP responses.

Every error class, the service's own included (``UnauthorizedError``, ``NotDeployedError``,
``ReplicaUnavailableError``...), lives in the one tree of ``raytseg.errors`` with its
HTTP status. ``as_raytseg_error`` turns whatever a request raised (Ray's wrappers included) into a
member of the tree, and ``http_error`` turns that into status, JSON body and headers.
Nothing here imports Ray at module level.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from raytseg import errors
from raytseg.errors import (
    InternalError,
    OverloadedError,
    RaytsegError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    StorageUnavailableError,
    UnauthorizedError,
)

# Serve's states of a deployment whose replicas fail to start or fail their health checks.
FAILED_STATES = ("UNHEALTHY", "DEPLOY_FAILED")
# Retrying later helps for these; the others will fail the same way again.
_RETRYABLE = (OverloadedError, ReplicaUnavailableError, StorageUnavailableError)


@dataclass(frozen=True)
class HttpError:
    """What the ingress answers for an error."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def http_error(error: RaytsegError, *, overload_status: int = 503, retry_after_s: int = 30) -> HttpError:
    """Status, JSON body ``{"error": {type, message, status}}`` and headers for ``error``."""
    status = overload_status if isinstance(error, OverloadedError) else error.status_code
    headers: dict[str, str] = {}
    if isinstance(error, _RETRYABLE):
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(error, UnauthorizedError):
        headers["WWW-Authenticate"] = 'Bearer realm="raytseg"'
    body = {"error": {"type": type(error).__name__, "message": error.message, "status": status}}
    return HttpError(status, body, headers)


def as_raytseg_error(exc: BaseException) -> RaytsegError:
    """The member of the error tree that describes ``exc``.

    Ray re-raises a replica's exception wrapped in ``RayTaskError`` (whose ``cause`` is the
    original), and Serve wraps some failures once more (an upstream replica that died is a
    ``RayServeException`` caused by one); the chain is followed to the first exception
    that says what happened. Serve's own failures (queue full, replica gone) and timeouts
    are translated. Anything else becomes ``InternalError``: its text may hold paths or
    data, so it goes to the log, not to the client.
    """
    for candidate in _chain(exc):
        if isinstance(candidate, RaytsegError) and not _is_task_error(candidate):
            return candidate
        if isinstance(candidate, asyncio.TimeoutError | TimeoutError):
            return RequestTimeoutError("The request ran past its deadline. Retry later or use the job API.")
        translated = _from_ray(candidate)
        if translated is not None:
            return translated
    return InternalError("Internal error; the service logged the details.")


def _is_task_error(exc: BaseException) -> bool:
    """Ray's wrapper of a replica's exception (it subclasses the original's class too)."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:
        return False
    return isinstance(exc, RayTaskError)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, then what caused it: Ray's ``cause`` of a task error, or ``__cause__``."""
    chain = [exc]
    for _ in range(10):  # one wrapper per deployment the error crossed
        current = chain[-1]
        cause = getattr(current, "cause", None)
        if not isinstance(cause, BaseException) or cause is current:
            cause = current.__cause__
        if cause is None or cause in chain:
            break
        chain.append(cause)
    return chain


def _from_ray(exc: BaseException) -> RaytsegError | None:
    try:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors
    except ImportError:  # the ingress always has Ray; unit tests may not
        return None
    if isinstance(exc, serve_errors.BackPressureError):
        return OverloadedError("The service is at capacity. Retry after the Retry-After delay.")
    if isinstance(exc, ray_errors.OutOfMemoryError):
        return ReplicaUnavailableError("A replica ran out of memory. Retry, or send a smaller image.")
    gone = (
        serve_errors.DeploymentUnavailableError,
        ray_errors.RayActorError,
        ray_errors.ObjectLostError,
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
    )
    if isinstance(exc, gone):
        return ReplicaUnavailableError("A replica stopped while serving the request. Retry it.")
    return None


def startup_error(message: str) -> str:
    """The last raytseg error class named in Serve's message about a deployment whose
    replicas fail to start, else a generic phrase (the class only: no paths or details)."""
    named = re.findall(r"\b([A-Z][A-Za-z]+Error)\b", message or "")
    ours = [name for name in named if isinstance(getattr(errors, name, None), type)]
    return ours[-1] if ours else "the replicas fail to start (see their logs)"
