"""Retries with exponential backoff for transient storage errors.

Used by batch jobs (listing, reading, writing, committing) and by DICOMweb transfers.
Object stores and DICOMweb servers fail transiently (throttling, dropped connections, 5xx) and s3fs/botocore
retry a few of those themselves; what still comes through is retried here a few more
times. Errors that another try cannot fix (a missing object, no permission, a corrupt
image) are raised at once.
"""

from __future__ import annotations

import logging
import random
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from raytseg.errors import InputError, LicenseError, StorageUnavailableError, WeightsError

log = logging.getLogger(__name__)
T = TypeVar("T")

_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
_PERMANENT_ERRORS = (InputError, LicenseError, WeightsError, *_PERMANENT_OS_ERRORS)


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more tries after the first, waiting ``delay_s``, 2x, 4x... (±25 %) between them."""

    retries: int = 4
    delay_s: float = 0.5
    max_delay_s: float = 20.0

    def call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, tried again after transient errors; the last error is raised."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if attempt >= self.retries or not is_transient(exc):
                    raise
                delay = min(self.max_delay_s, self.delay_s * 2**attempt) * random.uniform(0.75, 1.25)
                attempt += 1
                log.warning("%s failed (%s); retry %d/%d in %.1f s", what, exc, attempt, self.retries, delay)
                time.sleep(delay)


# For work that has nothing else to do meanwhile (a replica fetching its weights, the job
# store): rides out about 30 s of storage that does not answer (0.5 + 1 + 2 + 4 + 8 + 16 s).
OUTAGE_RETRY = RetryPolicy(retries=6, delay_s=0.5, max_delay_s=16.0)


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: I/O and network errors, unless they say otherwise.

    The chain of causes is inspected because raytseg wraps I/O errors in ``StorageError``.
    """
    seen: BaseException | None = exc
    transient = False
    while seen is not None:
        if isinstance(seen, _PERMANENT_ERRORS) or _refused_by_http(seen):
            return False
        if isinstance(seen, StorageUnavailableError | OSError | TimeoutError | ConnectionError):
            transient = True
        transient = transient or _is_network_error(seen)
        seen = seen.__cause__
    return transient


def _refused_by_http(exc: BaseException) -> bool:
    """An HTTP answer that another try gets again (4xx but for timeouts and throttling)."""
    return isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500 and exc.code not in (408, 429)


def _is_network_error(exc: BaseException) -> bool:
    """A client library's network failure that is no ``OSError``: botocore's connection and
    timeout errors, which s3fs raises as they are. Looked up by module, so that botocore is
    imported only where it raised something already."""
    if not type(exc).__module__.startswith("botocore"):
        return False
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, BotoConnectionError | HTTPClientError)
