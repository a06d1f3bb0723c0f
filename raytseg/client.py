"""A small synchronous client for the raytseg HTTP service.

    from raytseg.client import Client

    with Client("http://127.0.0.1:8000", token="...") as client:
        result = client.segment("ct.nii.gz", fast=True)
        result.save("segmentation.nii.gz")             # the multilabel NIfTI
        job = client.submit_job("s3://in/ct.nii.gz", "s3://out/case1/", fast=True)
        done = client.wait(job)                        # {"state": "succeeded", "outputs": [...]}
        client.modality("ct.nii.gz")                   # {"modality": "ct", "probability": 1.0}

Errors come back as the service's error classes (the tree of ``raytseg.errors``:
``UnreadableImageError``, ``OverloadedError``...), carrying the service's message; an
error the tree does not know is a ``ServiceError``. Needs only httpx.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from raytseg import errors as _errors
from raytseg.errors import RaytsegError

__all__ = ["Client", "SegmentResult", "ServiceError"]
_FINAL_STATES = ("succeeded", "failed")
Image = bytes | str | os.PathLike[str]  # the bytes, or a path to a NIfTI file or a DICOM zip


class ServiceError(RaytsegError):
    """An error answer whose type this client does not know (or a non-JSON error)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class SegmentResult:
    """The answer of ``POST /v1/segment``: a multilabel NIfTI, or a zip of files."""

    content: bytes
    media_type: str
    filename: str

    @property
    def is_zip(self) -> bool:
        return self.media_type == "application/zip"

    def files(self) -> dict[str, bytes]:
        """``{name: bytes}``: the zip's members, or ``{filename: content}`` for a NIfTI."""
        if not self.is_zip:
            return {self.filename: self.content}
        with zipfile.ZipFile(io.BytesIO(self.content)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}

    @property
    def statistics(self) -> dict[str, Any] | None:
        """statistics.json as a dict, when it was asked for."""
        data = self.files().get("statistics.json") if self.is_zip else None
        return None if data is None else dict(json.loads(data))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the content as received (a ``.nii.gz`` or a ``.zip``)."""
        target = Path(path)
        target.write_bytes(self.content)
        return target


class Client:
    """Synchronous client for ``/v1/segment``, ``/v1/jobs``, ``/v1/tasks``, ``/v1/modality``
    and ``/v1/phase``.

    Args:
        base_url: the service, e.g. ``http://127.0.0.1:8000``.
        token: API token, sent as ``Authorization: Bearer``.
        timeout_s: read timeout of a request (a segmentation can take minutes).
        retries: how often to retry a 503/429 answer, waiting as ``Retry-After`` says.
        transport: an httpx transport (tests use ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 1800.0,
        retries: int = 0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self._retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def segment(self, image: Image, *, task: str = "total", **options: Any) -> SegmentResult:
        """Segment an image (bytes, or a path to a NIfTI file or a DICOM zip).

        ``options`` are the query parameters: ``fast``, ``fastest``, ``roi_subset`` (a list),
        ``ml`` (default true), ``statistics``, ``robust_crop``, ``body_seg``, ``force_split``...
        """
        response = self._upload("/v1/segment", image, {"task": task, **options})
        disposition = response.headers.get("content-disposition", "")
        filename = disposition.split("filename=")[-1].strip('"') if "filename=" in disposition else "result"
        media = response.headers.get("content-type", "application/octet-stream").split(";")[0]
        return SegmentResult(response.content, media, filename)

    def modality(self, image: Image, *, normalized_intensities: bool = False) -> dict[str, Any]:
        """CT or MR? ``{"modality": "ct" | "mr", "probability": p}``, as ``totalseg_get_modality``."""
        options = {"normalized_intensities": normalized_intensities}
        return dict(self._upload("/v1/modality", image, options).json())

    def phase(self, image: Image) -> dict[str, Any]:
        """A CT's contrast phase: ``pi_time``, ``phase``, ``probability``... as ``totalseg_get_phase``."""
        return dict(self._upload("/v1/phase", image, {}).json())

    def submit_job(
        self,
        input_uri: str,
        output_uri: str,
        *,
        task: str = "total",
        idempotency_key: str | None = None,
        **options: Any,
    ) -> str:
        """Queue a job; returns its id.

        Sent with an ``Idempotency-Key`` (a new UUID unless given), so that this client's
        own retries after 429/503 never queue the job twice. Pass your own key to make a
        resubmission after a crash of your program answer the job it made.
        """
        body = {"input_uri": input_uri, "output_uri": output_uri, "task": task, "options": options}
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return str(self._send("POST", "/v1/jobs", json=body, headers=headers).json()["id"])

    def submit_tool_job(
        self,
        input_uri: str,
        output_uri: str,
        tool: str,
        *,
        normalized_intensities: bool = False,
        idempotency_key: str | None = None,
    ) -> str:
        """Queue a classifier tool (``get-modality``, ``get-phase``) whose JSON answer goes to
        ``output_uri`` (a ``.json`` location; also the record's ``answer``); returns its id."""
        spec = {"name": tool} | ({"normalized_intensities": True} if normalized_intensities else {})
        body = {"input_uri": input_uri, "output_uri": output_uri, "tool": spec}
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return str(self._send("POST", "/v1/jobs", json=body, headers=headers).json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's record: ``state``, ``outputs``, ``error``..."""
        return dict(self._send("GET", f"/v1/jobs/{job_id}").json())

    def wait(self, job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the job succeeded (its record) or failed (raises its error).

        Raises:
            RaytsegError: the job's error, as its class; TimeoutError after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self.job(job_id)
            if record["state"] == "failed":
                raise _error_from(record.get("error") or {}, 500)
            if record["state"] in _FINAL_STATES:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Job {job_id} still {record['state']} after {timeout_s} s.")
            time.sleep(poll_s)

    def tasks(self) -> list[dict[str, Any]]:
        """Catalogue tasks with their classes and the modes the service serves."""
        return list(self._send("GET", "/v1/tasks").json())

    def ready(self) -> bool:
        """True once every deployment of the service has a running replica."""
        return self._http.get("/readyz").status_code == 200

    def _upload(self, route: str, image: Image, options: Mapping[str, Any]) -> httpx.Response:
        body = image if isinstance(image, bytes) else Path(image).read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        return self._send("POST", route, params=_query(options), content=body, headers=headers)

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self._retries + 1):
            response = self._http.request(method, url, **kwargs)
            if response.status_code not in (429, 503) or attempt == self._retries:
                break
            time.sleep(min(float(response.headers.get("retry-after", "5") or 5), 60.0))
        if response.status_code >= 400:
            raise _error_from(_error_body(response), response.status_code)
        return response


def _query(options: Mapping[str, Any]) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    for key, value in options.items():
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        params += [(key, str(v).lower() if isinstance(v, bool) else str(v)) for v in values]
    return params


def _error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        return error
    return {"type": "ServiceError", "message": f"HTTP {response.status_code}: {response.text[:200]}"}


def _error_from(error: Mapping[str, Any], status: int) -> RaytsegError:
    """The error class the service named, with its message; ``ServiceError`` if unknown."""
    name, message = str(error.get("type", "")), str(error.get("message", ""))
    status = int(error.get("status", status))
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, RaytsegError) and cls is not RaytsegError:
        return cls(message)
    return ServiceError(message, status)
