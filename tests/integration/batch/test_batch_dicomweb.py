"""A batch over a DICOMweb search, storing its SEGs back on the server (a real Orthanc),
with the server stopped for 10 s in the middle: no item lost, none stored twice."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from raytseg.batch import BatchConfig, run_batch
from raytseg.batch.commit import MARKER_NAME
from tests.integration.conftest import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    Orthanc,
    Outage,
    assert_seg_is_the_nifti,
    series_with_uids,
)

REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "totalseg-reference"
OUTAGE_S = 10.0


@pytest.fixture(scope="module")
def dicomweb_credentials() -> Iterator[None]:
    """Orthanc's credentials in the environment before Ray starts, so its workers have them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYTSEG_DICOMWEB_USER", ORTHANC_USER)
        patch.setenv("RAYTSEG_DICOMWEB_PASSWORD", ORTHANC_PASSWORD)
        yield


pytestmark = pytest.mark.usefixtures("dicomweb_credentials", "local_ray")


def test_a_search_is_segmented_and_stored_once_through_an_outage(orthanc: Orthanc, tmp_path: Path) -> None:
    studies = {}
    for salt in ("patient-a", "patient-b", "patient-c"):
        study, series, blobs = series_with_uids(REFERENCE / "example_ct_dicom", salt)
        orthanc.upload(blobs)
        studies[series] = study
    output = tmp_path / "out"
    config = BatchConfig(
        input=f"{orthanc.dicomweb}/series?Modality=CT",
        output=str(output),
        fast=True,
        device="cpu",
        output_type=("nifti", "dicom_seg"),
        dicom_seg_type="labelmap",
        dicomweb_store=orthanc.dicomweb,
        retries=6,  # 0.5 s doubling: covers the 10 s outage
    )
    outage = Outage(orthanc, lambda: bool(list(output.glob(f"*/{MARKER_NAME}"))), OUTAGE_S)
    report = run_batch(config)
    restarted = outage.join()

    assert [r.status for r in report.results] == ["ok"] * 3, [r.error_message for r in report.results]
    assert {r.id for r in report.results} == set(studies)
    finished = [datetime.fromisoformat(r.finished_at).timestamp() for r in report.results]
    assert max(finished) >= int(restarted), "no item was in flight during the outage"
    for result in report.results:
        stored = [o for o in result.outputs if o.startswith("dicomweb+")]
        assert len(stored) == 1
        assert stored[0].startswith(f"{orthanc.dicomweb}/studies/{studies[result.id]}/series/")
        _assert_one_seg(orthanc, studies[result.id], output / result.id / "segmentation.nii.gz")

    again = run_batch(config)  # a rerun finds every item done and stores nothing
    assert [r.status for r in again.results] == ["skipped"] * 3
    assert len(orthanc.get("/instances")) == 3 * 20 + 3


def _assert_one_seg(orthanc: Orthanc, study: str, multilabel: Path) -> None:
    ids = [f["ID"] for f in orthanc.post_json("/tools/lookup", study) if f["Type"] == "Study"]
    segs = [s for s in orthanc.get(f"/studies/{ids[0]}/series") if s["MainDicomTags"]["Modality"] == "SEG"]
    assert len(segs) == 1
    assert len(segs[0]["Instances"]) == 1
    assert_seg_is_the_nifti(orthanc.get_bytes(f"/instances/{segs[0]['Instances'][0]}/file"), multilabel)
