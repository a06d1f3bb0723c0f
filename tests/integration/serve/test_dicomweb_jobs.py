"""Jobs by DICOMweb URI against a real Orthanc: the series is read with WADO-RS, the SEG
stored back with STOW-RS under the same study; servers outside the allow-list are 403."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    Orthanc,
    assert_seg_is_the_nifti,
    series_with_uids,
)
from tests.integration.serve.conftest import wait_for_job

REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "totalseg-reference"


@pytest.fixture
def orthanc_port(service: Any) -> int:
    return int(service.dicomweb_port)  # the one the service's allow-list admits


def test_a_job_reads_a_series_and_stores_its_seg_under_the_study(
    api: httpx.Client, service: Any, orthanc: Orthanc
) -> None:
    study, series, blobs = series_with_uids(REFERENCE / "example_ct_dicom", "serve-job")
    orthanc.upload(blobs)
    out = service.jobs_dir / "out" / "dicomweb"
    body = {
        "input_uri": f"{orthanc.dicomweb}/studies/{study}/series/{series}",
        "output_uri": str(out),
        "options": {"fast": True, "output_type": ["nifti", "dicom_seg"], "dicomweb_store": orthanc.dicomweb},
    }
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    record = wait_for_job(api, answer.json()["id"])
    assert record["state"] == "succeeded", record
    files, stored = record["outputs"][:2], record["outputs"][2:]
    assert files == [str(out / "segmentation.nii.gz"), str(out / "segmentation_seg.dcm")]
    assert len(stored) == 1
    assert stored[0].startswith(f"{orthanc.dicomweb}/studies/{study}/series/")
    seg_id = orthanc.post_json("/tools/lookup", stored[0].rsplit("/", 1)[1])[0]["ID"]
    assert_seg_is_the_nifti(orthanc.get_bytes(f"/instances/{seg_id}/file"), out / "segmentation.nii.gz")
    _assert_no_credentials_in_logs(service.ray_dir)


def _assert_no_credentials_in_logs(ray_dir: Path) -> None:
    basic = base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode())
    logs = [p for p in ray_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert logs
    leaks = [p for p in logs if ORTHANC_PASSWORD.encode() in p.read_bytes() or basic in p.read_bytes()]
    assert not leaks


def test_dicomweb_servers_outside_the_allow_list_are_403(api: httpx.Client, service: Any) -> None:
    other = f"dicomweb+http://127.0.0.1:{service.dicomweb_port + 1}/dicom-web"
    out = str(service.jobs_dir / "out" / "refused")
    for body in (
        {"input_uri": f"{other}/studies/1.2/series/3.4", "output_uri": out},
        {
            "input_uri": str(service.jobs_dir / "in" / "ct.nii.gz"),
            "output_uri": out,
            "options": {"output_type": ["dicom_seg"], "dicomweb_store": other},
        },
    ):
        answer = api.post("/v1/jobs", json=body)
        assert answer.status_code == 403, answer.text
    refused = api.post(
        "/v1/segment", params={"dicomweb_store": other, "output_type": "dicom_seg"}, content=b"x"
    )
    assert refused.status_code == 422  # not an option of /v1/segment
