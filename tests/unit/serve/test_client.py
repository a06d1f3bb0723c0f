"""raytseg.client against a mocked transport: requests it sends, answers it decodes."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable

import httpx
import pytest

from raytseg.client import Client, ServiceError
from raytseg.errors import JobNotFoundError, OverloadedError, UnreadableImageError

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, **kwargs: object) -> Client:
    return Client("http://svc", token="t" * 20, transport=httpx.MockTransport(handler), **kwargs)  # type: ignore[arg-type]


def test_segment_sends_body_params_and_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-disposition": 'attachment; filename="segmentation.nii.gz"'}
        return httpx.Response(
            200, content=b"\x1f\x8bnifti", headers={**headers, "content-type": "application/gzip"}
        )

    result = client(handler).segment(b"image", fast=True, roi_subset=["liver", "spleen"], statistics=None)
    request = seen[0]
    assert request.headers["authorization"] == "Bearer " + "t" * 20
    assert request.content == b"image"
    assert request.url.params.multi_items() == [
        ("task", "total"),
        ("fast", "true"),
        ("roi_subset", "liver"),
        ("roi_subset", "spleen"),
    ]
    assert result.filename == "segmentation.nii.gz"
    assert not result.is_zip
    assert result.files() == {"segmentation.nii.gz": b"\x1f\x8bnifti"}
    assert result.statistics is None


def test_zip_answers_expose_files_and_statistics() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("liver.nii.gz", b"mask")
        archive.writestr("statistics.json", json.dumps({"liver": {"volume": 1.0, "intensity": 2.0}}))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=buffer.getvalue(), headers={"content-type": "application/zip"})

    result = client(handler).segment(b"image", ml=False, statistics=True)
    assert result.is_zip
    assert set(result.files()) == {"liver.nii.gz", "statistics.json"}
    assert result.statistics == {"liver": {"volume": 1.0, "intensity": 2.0}}


def test_errors_come_back_as_their_classes() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/segment":
            body = {"error": {"type": "UnreadableImageError", "message": "not NIfTI", "status": 400}}
            return httpx.Response(400, json=body)
        if request.url.path.startswith("/v1/jobs/"):
            return httpx.Response(
                404, json={"error": {"type": "JobNotFoundError", "message": "no", "status": 404}}
            )
        return httpx.Response(502, text="<html>bad gateway</html>")

    c = client(handler)
    with pytest.raises(UnreadableImageError, match="not NIfTI"):
        c.segment(b"x")
    with pytest.raises(JobNotFoundError):
        c.job("abc")
    with pytest.raises(ServiceError, match="HTTP 502") as info:
        c.tasks()
    assert info.value.status_code == 502


def test_retries_overload_as_retry_after_says(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("raytseg.client.time.sleep", sleeps.append)
    answers = iter([503, 429, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status != 200:
            body = {"error": {"type": "OverloadedError", "message": "busy", "status": status}}
            return httpx.Response(status, json=body, headers={"retry-after": "3"})
        return httpx.Response(200, json=[])

    assert client(handler, retries=2).tasks() == []
    assert sleeps == [3.0, 3.0]
    answers = iter([503, 503])
    with pytest.raises(OverloadedError):
        client(handler, retries=1).tasks()


def test_submit_and_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("raytseg.client.time.sleep", lambda s: None)
    states = iter(["queued", "running", "succeeded"])
    bodies: list[dict[str, object]] = []
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            bodies.append(json.loads(request.content))
            keys.append(request.headers.get("Idempotency-Key"))
            if len(keys) == 1:
                return httpx.Response(503, headers={"Retry-After": "1"}, json={})
            return httpx.Response(202, json={"id": "j1", "state": "queued"})
        return httpx.Response(
            200, json={"id": "j1", "state": next(states), "outputs": ["memory://o/seg.nii.gz"]}
        )

    c = client(handler, retries=1)
    job = c.submit_job("memory://i/ct.nii.gz", "memory://o/", fast=True)
    assert bodies[-1] == {
        "input_uri": "memory://i/ct.nii.gz",
        "output_uri": "memory://o/",
        "task": "total",
        "options": {"fast": True},
    }
    assert len(keys) == 2
    assert keys[0] == keys[1]  # the retry after 503 is the same submission
    assert keys[0]
    assert c.wait(job)["outputs"] == ["memory://o/seg.nii.gz"]
    c.submit_job("memory://i/ct.nii.gz", "memory://o/", idempotency_key="mine-0001")
    assert keys[-1] == "mine-0001"


def test_wait_raises_the_jobs_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("raytseg.client.time.sleep", lambda s: None)

    def handler(request: httpx.Request) -> httpx.Response:
        error = {"type": "UnreadableImageError", "message": "truncated", "status": 400}
        return httpx.Response(200, json={"id": "j1", "state": "failed", "error": error})

    with pytest.raises(UnreadableImageError, match="truncated"):
        client(handler).wait("j1")


def test_every_error_of_the_tree_comes_back_as_itself() -> None:
    from raytseg import errors
    from raytseg.client import _error_from

    tree = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RaytsegError)]
    assert len(tree) > 20
    for cls in tree:
        if cls is errors.RaytsegError:
            continue
        error = _error_from({"type": cls.__name__, "message": "m", "status": cls.status_code}, 500)
        assert type(error) is cls
        assert (error.message, error.status_code) == ("m", cls.status_code)
    unknown = _error_from({"type": "NoSuchError", "message": "m", "status": 418}, 500)
    assert (type(unknown), unknown.status_code) == (ServiceError, 418)


def test_the_tools_send_the_image_and_decode_the_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"modality": "mr", "probability": 0.8})

    assert client(handler).modality(b"image", normalized_intensities=True) == {
        "modality": "mr",
        "probability": 0.8,
    }
    assert client(handler).phase(b"ct")["modality"] == "mr"
    assert [(r.url.path, r.url.params.multi_items(), r.content) for r in seen] == [
        ("/v1/modality", [("normalized_intensities", "true")], b"image"),
        ("/v1/phase", [], b"ct"),
    ]
