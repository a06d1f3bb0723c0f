"""POST /v1/segment over HTTP: byte-identical to the in-process pipeline, parts in parallel."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from raytseg.config import Settings
from raytseg.pipeline.labeltable import read_label_table
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.radiomics import FILE_NAME as RADIOMICS_FILE
from raytseg.pipeline.radiomics import radiomics_json
from raytseg.pipeline.records import SegmentOptions

Reference = Callable[[bytes, SegmentOptions], bytes]


def test_fast_round_trip_is_byte_identical(api: httpx.Client, ct: bytes, reference: Reference) -> None:
    answer = api.post("/v1/segment", params={"task": "total", "fast": "true"}, content=ct)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/gzip"
    assert answer.headers["content-disposition"] == 'attachment; filename="segmentation.nii.gz"'
    assert answer.content == reference(ct, SegmentOptions(task="total", fast=True))


def test_total_parts_run_concurrently(
    api: httpx.Client,
    small_ct: bytes,
    reference: Reference,
    replica_calls: Callable[[str], dict[str, list[tuple[float, float]]]],
    waiter: Callable[..., None],
) -> None:
    """The five 1.5 mm parts are computed at the same time, each on its own replica.

    Evidence: Serve's access log of each part's replica (the call's end time and duration,
    under the HTTP request's id): every call started before any of them ended.
    """
    answer = api.post("/v1/segment", params={"task": "total"}, content=small_ct)
    assert answer.status_code == 200, answer.text
    assert answer.content == reference(small_ct, SegmentOptions(task="total"))
    parts = [f"Model{i}" for i in range(291, 296)]
    request_id = answer.headers["x-request-id"]
    waiter(lambda: set(parts) <= set(replica_calls(request_id)), 30, "the parts' access logs")
    calls = replica_calls(request_id)
    spans = [span for part in parts for span in calls[part]]
    assert len(spans) == 5
    latest_start, earliest_end = max(s for s, _ in spans), min(e for _, e in spans)
    assert latest_start < earliest_end, f"parts ran one after another: {sorted(spans)}"


def test_roi_subset_runs_the_crop_pass(api: httpx.Client, ct: bytes, reference: Reference) -> None:
    rois = ["spinal_cord", "kidney_cyst_right", "sacrum"]
    params: list[tuple[str, str]] = [
        ("fast", "true"),
        ("roi_subset", ",".join(rois[:2])),
        ("roi_subset", rois[2]),
    ]
    answer = api.post("/v1/segment", params=params, content=ct)
    assert answer.status_code == 200, answer.text
    expected = reference(ct, SegmentOptions(task="total", fast=True, roi_subset=tuple(rois)))
    assert answer.content == expected


def test_dicom_zip_upload(
    api: httpx.Client, make_zip: Any, reference: Reference, reference_data: Path
) -> None:
    folder = reference_data / "example_ct_dicom"
    body = make_zip({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    answer = api.post("/v1/segment", params={"fast": "true"}, content=body)
    assert answer.status_code == 200, answer.text
    assert answer.content == reference(body, SegmentOptions(task="total", fast=True))


def test_dicom_outputs_answer_dicom_or_a_zip(
    api: httpx.Client, make_zip: Any, reference: Reference, reference_data: Path, tiny_ct: bytes
) -> None:
    """``output_type=dicom_seg`` answers the SEG itself (application/dicom), holding the
    in-process labels; with RTSTRUCT too, a zip of both; for a NIfTI upload, 422."""
    import nibabel as nib

    from raytseg.testing import seg_masks

    folder = reference_data / "example_ct_dicom"
    body = make_zip({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    answer = api.post("/v1/segment", params={"fast": "true", "output_type": "dicom_seg"}, content=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom"
    assert answer.headers["content-disposition"] == 'attachment; filename="segmentation_seg.dcm"'
    expected = nib.Nifti1Image.from_bytes(
        gzip.decompress(reference(body, SegmentOptions(task="total", fast=True)))
    )
    labels = np.asarray(expected.dataobj)
    masks = seg_masks(answer.content, expected.affine, labels.shape)
    table = read_label_table(expected)
    assert list(masks) == [name for k, name in table.items() if (labels == k).any()]
    for k, name in table.items():
        if name in masks:
            np.testing.assert_array_equal(masks[name], labels == k, err_msg=name)
    # The labelmap SEG (one frame per slice) saves the binary one's encoding a second time;
    # three classes (the DICOM parity case's): the RTSTRUCT of every noisy class took 50 s.
    kinds = {"output_type": "dicom_seg,dicom_rtstruct", "dicom_seg_type": "labelmap"}
    subset = {"roi_subset": "liver,spleen,aorta"}
    both = api.post("/v1/segment", params={"fast": "true", **kinds, **subset}, content=body)
    assert both.status_code == 200, both.text
    names = zipfile.ZipFile(io.BytesIO(both.content)).namelist()
    assert names == ["segmentation_seg.dcm", "segmentation_rtstruct.dcm"]
    refused = api.post("/v1/segment", params={"fast": "true", "output_type": "dicom_seg"}, content=tiny_ct)
    assert refused.status_code == 422
    assert refused.json()["error"]["type"] == "DicomOutputError"
    assert "this input is NIfTI" in refused.json()["error"]["message"]


def test_an_mr_dicom_series_runs_total_mr(
    api: httpx.Client, make_zip: Any, reference: Reference, reference_data: Path
) -> None:
    """Task ``total`` on a DICOM series tagged MR runs ``total_mr``, as ``raytseg segment`` does.

    The series is the example CT with its Modality tag set to MR: the rule reads the tag.
    """
    import pydicom

    members = {}
    for path in sorted((reference_data / "example_ct_dicom").iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.Modality = "MR"
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        members[path.name] = buffer.getvalue()
    body = make_zip(members)
    answer = api.post("/v1/segment", params={"fast": "true"}, content=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-disposition"] == 'attachment; filename="segmentation.nii.gz"'
    assert answer.content == reference(body, SegmentOptions(task="total", fast=True))


def test_concurrent_requests(service: Any, ct: bytes, tiny_ct: bytes, reference: Reference) -> None:
    bodies = [ct, tiny_ct, ct, tiny_ct]

    def send(body: bytes) -> httpx.Response:
        with service.client() as client:
            return client.post("/v1/segment", params={"fast": "true"}, content=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(send, bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies)
    options = SegmentOptions(task="total", fast=True)
    assert answers[0].content == answers[2].content == reference(ct, options)
    assert answers[1].content == answers[3].content == reference(tiny_ct, options)


def test_per_class_zip_with_statistics_and_radiomics(
    api: httpx.Client, tiny_ct: bytes, read_image: Any
) -> None:
    params = {"fast": "true", "ml": "false", "statistics": "true", "radiomics": "true"}
    answer = api.post("/v1/segment", params=params, content=tiny_ct)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        names = archive.namelist()
        stats = json.loads(archive.read("statistics.json"))
        liver = read_image(archive.read("liver.nii.gz"))
        masks = [(name, archive.read(name)) for name in names if name.endswith(".nii.gz")]
        features = archive.read(RADIOMICS_FILE)
    assert len(names) == 117 + 2
    assert "spleen.nii.gz" in names
    assert set(stats["liver"]) == {"volume", "intensity"}
    assert liver.shape == (24, 24, 10)
    volume = load_volume(tiny_ct, LoadLimits.from_settings(Settings.from_env()))
    assert features == radiomics_json(volume, masks)  # of the very files in the zip
    assert len(json.loads(features)) == 117


def test_tasks_docs_and_readiness(api: httpx.Client, service: Any) -> None:
    tasks = {t["name"]: t for t in api.get("/v1/tasks").json()}
    assert tasks["total"]["served_modes"] == ["default", "fast"]
    assert tasks["total"]["dedicated"]
    assert tasks["lung_vessels"]["served_modes"] == []
    assert tasks["total"]["classes"]["1"] == "spleen"
    with service.client(token=None) as anonymous:  # probes and docs need no token
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True
        assert anonymous.get("/docs").status_code == 200
        paths = anonymous.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/tasks", "/healthz", "/readyz"} <= set(paths)
