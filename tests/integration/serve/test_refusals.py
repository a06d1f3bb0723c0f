"""Every refusal has its status, and the service keeps serving after each one."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import pytest

Params = dict[str, str] | list[tuple[str, str]]


def _absurd_header() -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape((32_000, 32_000, 32_000))
    return header.binaryblock + b"\x00" * 4  # a header promising 3e13 voxels, and no data


def _two_series_zip(make_zip: Callable[[dict[str, bytes]], bytes], dicom: Path, tmp: Path) -> bytes:
    import pydicom

    members = {}
    for i, path in enumerate(sorted(dicom.iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.1" if i < 10 else "1.2.826.0.1.2"
        ds.save_as(tmp / path.name)
        members[path.name] = (tmp / path.name).read_bytes()
    return make_zip(members)


@pytest.fixture(scope="module")
def bad_inputs(
    make_image: Callable[..., bytes],
    make_zip: Callable[[dict[str, bytes]], bytes],
    reference_data: Path,
    tmp_path_factory: Any,
) -> dict[str, tuple[bytes, Params, int, str]]:
    good = make_image((8, 8, 8))
    cases = {
        "unreadable": (b"this is not an image" * 20, {}, 400, "UnreadableImageError"),
        "truncated": (good[: len(good) // 2], {}, 400, "UnreadableImageError"),
        "2d": (make_image((16, 16)), {}, 422, "InvalidImageError"),
        "4d": (make_image((8, 8, 8, 3)), {}, 422, "InvalidImageError"),
        "absurd-dims": (gzip.compress(_absurd_header()), {}, 413, "ImageTooLargeError"),
        "zip-traversal": (make_zip({"a/../../etc/slice.dcm": b"x"}), {}, 400, "UnsafeArchiveError"),
        "unknown-task": (good, {"task": "not_a_task"}, 404, "UnknownTaskError"),
        "unknown-class": (good, {"fast": "true", "roi_subset": "no_such_organ"}, 422, "UnknownClassError"),
        "not-deployed": (good, {"task": "body"}, 422, "NotDeployedError"),
        # total_mr (which task auto runs on MR images) has no kidney cysts
        "auto-unknown-class": (
            good,
            {"task": "auto", "fast": "true", "roi_subset": "kidney_cyst_left"},
            422,
            "UnknownClassError",
        ),
        "fast-and-fastest": (good, {"fast": "true", "fastest": "true"}, 422, "InvalidOptionError"),
        "unknown-parameter": (good, {"fsat": "true"}, 422, "InvalidOptionError"),
        "sl-preview": (good, {"fast": "1", "save_lowres": "1", "preview": "1"}, 422, "InvalidOptionError"),
        "sl-not-fast": (good, {"save_lowres": "true"}, 422, "InvalidOptionError"),
        "empty-body": (b"", {"fast": "true"}, 400, "UnreadableImageError"),
    }
    tmp = tmp_path_factory.mktemp("dicom")
    two_series = _two_series_zip(make_zip, reference_data / "example_ct_dicom", tmp)
    cases["multi-series-dicom"] = (two_series, {"fast": "true"}, 422, "AmbiguousDicomError")
    return cases


CASES = [
    "unreadable",
    "truncated",
    "2d",
    "4d",
    "absurd-dims",
    "zip-traversal",
    "multi-series-dicom",
    "unknown-task",
    "unknown-class",
    "auto-unknown-class",
    "not-deployed",
    "fast-and-fastest",
    "unknown-parameter",
    "empty-body",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_then_good_request(
    case: str, bad_inputs: dict[str, tuple[bytes, Params, int, str]], api: httpx.Client, tiny_ct: bytes
) -> None:
    body, params, status, error_type = bad_inputs[case]
    answer = api.post("/v1/segment", params=params, content=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["status"]) == (error_type, status)
    assert error["message"]
    good = api.post("/v1/segment", params={"fast": "true"}, content=tiny_ct)
    assert good.status_code == 200, good.text


def test_missing_or_wrong_token_is_401(service: Any, tiny_ct: bytes) -> None:
    for token in (None, "wrong-token-but-long-enough"):
        with service.client(token=token) as client:
            for answer in (client.post("/v1/segment", content=tiny_ct), client.get("/v1/tasks")):
                assert answer.status_code == 401
                assert answer.headers["www-authenticate"].startswith("Bearer")
                assert answer.json()["error"]["type"] == "UnauthorizedError"


def test_body_over_the_limit_is_413(api: httpx.Client, service: Any, tiny_ct: bytes) -> None:
    limit = service.config.limits.max_body_bytes
    big = b"\x00" * (limit + 1)
    answer = api.post("/v1/segment", params={"fast": "true"}, content=big)
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "ImageTooLargeError"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(limit // 2**20 + 2):
            yield b"\x00" * 2**20

    answer = api.post("/v1/segment", params={"fast": "true"}, content=chunks())
    assert answer.status_code == 413
    assert api.post("/v1/segment", params={"fast": "true"}, content=tiny_ct).status_code == 200


def test_more_requests_than_the_queue_holds_get_429(service: Any, ct: bytes, tiny_ct: bytes) -> None:
    held = service.config.limits.max_queued_requests

    def send(_: int) -> httpx.Response:
        with service.client() as client:
            return client.post("/v1/segment", params={"fast": "true"}, content=ct)

    with ThreadPoolExecutor(held + 4) as pool:
        answers = list(pool.map(send, range(held + 4)))
    statuses = sorted(a.status_code for a in answers)
    refused = [a for a in answers if a.status_code == 429]
    assert refused, statuses
    assert set(statuses) == {200, 429}
    assert statuses.count(200) >= held
    assert refused[0].headers["retry-after"] == "2"
    assert refused[0].json()["error"]["type"] == "OverloadedError"
    with service.client() as client:
        assert client.post("/v1/segment", params={"fast": "true"}, content=tiny_ct).status_code == 200


def test_no_secret_reaches_an_answer_or_a_log(service: Any, api: httpx.Client) -> None:
    """Tokens (right and wrong), credentials in a URI and the DICOMweb password the replicas
    hold: in no answer, and in no log file of the app's Ray session (every test of this
    package that ran before this one included)."""
    from tests.integration.conftest import ORTHANC_PASSWORD
    from tests.integration.serve.conftest import TOKEN

    wrong_token, uri_secret = "wrong-token-0f9e8d7c6b5a4", "uri-password-5b4a3c2d1e"
    body = {"input_uri": f"s3://AKIAEXAMPLE:{uri_secret}@bucket/ct.nii.gz", "output_uri": "s3://bucket/out/"}
    with service.client(token=wrong_token) as outsider:
        answers = [outsider.get("/v1/tasks"), outsider.post("/v1/jobs", json=body)]
    answers.append(api.post("/v1/jobs", json=body))
    assert [a.status_code for a in answers] == [401, 401, 403]
    secrets = (TOKEN, wrong_token, uri_secret, ORTHANC_PASSWORD)
    for answer in answers:
        assert not [s for s in secrets if s in answer.text or s in str(answer.headers)], answer.text
    logs = [p for p in service.ray_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert any("serve" in p.parts for p in logs)  # the replicas' logs are there to read
    leaked = {p.name: s for p in logs for s in secrets if s.encode() in p.read_bytes()}
    assert not leaked, leaked
