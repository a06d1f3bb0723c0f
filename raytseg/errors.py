"""Every error raytseg raises on purpose, in one tree.

Each class carries the HTTP status the service answers with, and each message tells
the user what to do next. Exceptions hold only a message string, so they pickle
cleanly when Ray re-raises them in another process.

    RaytsegError (500)
    ├── InputError (400)                 the request or the image is wrong
    │   ├── UnreadableImageError (400)   not NIfTI/DICOM, truncated, corrupt
    │   ├── InvalidImageError (422)      readable but unusable: 2D, 4D, bad spacing
    │   │   └── InconsistentDicomError (422)  slices missing, duplicated or mixed
    │   ├── ImageTooLargeError (413)     more voxels or bytes than configured
    │   ├── UnsafeArchiveError (400)     zip with path traversal or a zip bomb
    │   ├── AmbiguousDicomError (422)    several DICOM series in one input
    │   ├── UnknownTaskError (404)       task name not in the catalogue
    │   ├── UnknownClassError (422)      roi_subset / crop names the task lacks
    │   ├── InvalidOptionError (422)     option combination the task refuses
    │   │   └── NotDeployedError (422)   task/mode exists but this service lacks it
    │   ├── DicomOutputError (422)       DICOM-SEG/RTSTRUCT cannot describe this input
    │   ├── UriNotAllowedError (403)     job URI outside the allowed prefixes
    │   ├── JobNotFoundError (404)       no job with this id
    │   ├── IdempotencyConflictError (409)  an Idempotency-Key reused for another request
    │   └── BatchInputError (400)        batch input: listing, manifest, item ids
    ├── UnauthorizedError (401)          missing or wrong API token
    ├── LicenseError (403)               licensed task without a license key
    ├── WeightsError (503)               model weights missing or unusable
    │   ├── MissingWeightsError (503)    folder absent: names it and the fix
    │   └── WeightsIntegrityError (503)  checksum mismatch, bad archive, bad plans
    ├── MissingResourceError (503)       a data file of the TotalSegmentator package is absent
    ├── StorageError (502)               fsspec/S3 read or write failed
    │   └── StorageUnavailableError (503)  the storage did not answer; retrying later works
    ├── StaleOutputError (409)           batch outputs made with other options
    ├── ModelError (500)                 the network failed at run time
    ├── WorkerCrashedError (500)         a batch item's worker died on every try
    ├── InternalError (500)              unexpected; the message carries no internals
    ├── ReplicaUnavailableError (503)    a service replica died; retrying works
    ├── OverloadedError (503)            more queued work than configured
    └── RequestTimeoutError (504)        the request ran past its deadline
"""

from __future__ import annotations

from typing import Any


class RaytsegError(Exception):
    """Base of every error raytseg raises on purpose."""

    status_code = 500

    def __init_subclass__(cls, status: int | None = None, **kwargs: Any) -> None:
        """``class NotFound(RaytsegError, status=404)``: the status the service answers with."""
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status_code = status

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(RaytsegError, status=400):
    """The request or the image cannot be processed as given."""


class UnreadableImageError(InputError, status=400):
    """The bytes are not a readable NIfTI image or DICOM series."""


class InvalidImageError(InputError, status=422):
    """The image was read but cannot be segmented (dimensions, spacing, dtype)."""


class ImageTooLargeError(InputError, status=413):
    """The image (or the upload) exceeds a configured size limit."""


class UnsafeArchiveError(InputError, status=400):
    """A zip archive tries to escape its folder or expands past the limit."""


class AmbiguousDicomError(InputError, status=422):
    """A DICOM input holds more than one series."""


class UnknownTaskError(InputError, status=404):
    """The task name is not in the catalogue."""


class UnknownClassError(InputError, status=422):
    """A class name is not part of the task."""


class InvalidOptionError(InputError, status=422):
    """Options that the task or each other exclude."""


class DicomOutputError(InputError, status=422):
    """A DICOM output was asked for an input it cannot reference (e.g. a resampled series)."""


class MissingResourceError(RaytsegError, status=503):
    """A data file raytseg reads from the installed TotalSegmentator package is absent."""


class LicenseError(RaytsegError, status=403):
    """A licensed task was requested without a license key."""


class WeightsError(RaytsegError, status=503):
    """Model weights are missing or unusable."""


class MissingWeightsError(WeightsError, status=503):
    """A model folder is not in the weights store."""


class WeightsIntegrityError(WeightsError, status=503):
    """Downloaded or imported weights failed a check."""


class StorageError(RaytsegError, status=502):
    """Reading from or writing to storage failed."""


class StorageUnavailableError(StorageError, status=503):
    """The storage did not answer (connection refused or reset, timeout): a later try may work."""


class ModelError(RaytsegError, status=500):
    """The network failed while predicting."""


class OverloadedError(RaytsegError, status=503):
    """More work is queued than the service is configured to hold."""


class RequestTimeoutError(RaytsegError, status=504):
    """The request ran past its deadline."""


class NotDeployedError(InvalidOptionError, status=422):
    """The task, mode or model exists but this service deployment does not serve it."""


class UriNotAllowedError(InputError, status=403):
    """A job URI lies outside the configured prefixes."""


class JobNotFoundError(InputError, status=404):
    """No job has this id (or it was forgotten after newer ones)."""


class IdempotencyConflictError(InputError, status=409):
    """An ``Idempotency-Key`` was sent before with a different job request."""


class BatchInputError(InputError, status=400):
    """A batch job's input cannot be turned into work items (listing, manifest, ids)."""


class UnauthorizedError(RaytsegError, status=401):
    """The request lacks a valid ``Authorization: Bearer <token>`` header."""


class StaleOutputError(RaytsegError, status=409):
    """A batch item's folder holds complete outputs made with other options."""


class WorkerCrashedError(RaytsegError, status=500):
    """The process segmenting a batch item died on every try."""


class InternalError(RaytsegError, status=500):
    """An unexpected failure; the message carries no internals."""


class ReplicaUnavailableError(RaytsegError, status=503):
    """A replica the request needed died or is being replaced; retrying will work."""


class ModelUnavailableError(RaytsegError, status=503):
    """A model deployment the request needs cannot start its replicas (weights missing, a
    corrupt checkpoint): retrying will not help until its weights are fixed."""


class InconsistentDicomError(InvalidImageError, status=422):
    """The slices of a DICOM series do not form one volume (missing, duplicated, mixed)."""
