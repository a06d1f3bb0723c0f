"""DICOMweb in and out against a real Orthanc with its DICOMweb plugin (no Ray).

A series read with WADO-RS loads exactly like the same slices from a folder; a study and a
QIDO-RS search name their series; ``raytseg segment`` reads a series by URI and stores its
DICOM-SEG on the server with STOW-RS, under the source study, once however often it runs;
bad credentials, unknown series and a stopped server are clear errors.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

import raytseg
from raytseg import dicomweb
from raytseg.cli import main
from raytseg.errors import StorageError
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.retry import RetryPolicy, is_transient
from tests.integration.conftest import Orthanc, assert_seg_is_the_nifti, series_with_uids

LIMITS = LoadLimits(max_voxels=512 * 512 * 2048, max_archive_bytes=1 << 30)


@pytest.fixture
def series(orthanc: Orthanc, reference_data: Path) -> str:
    """The reference DICOM series on the server; its DICOMweb URI."""
    study, series, blobs = series_with_uids(reference_data / "example_ct_dicom", "dicomweb-test")
    orthanc.upload(blobs)
    return f"{orthanc.dicomweb}/studies/{study}/series/{series}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)
    return root


def test_a_series_loads_like_its_folder(series: str, reference_data: Path) -> None:
    remote = load_volume(series, LIMITS)
    local = load_volume(reference_data / "example_ct_dicom", LIMITS)
    assert remote.source.startswith(series)
    np.testing.assert_array_equal(remote.data, local.data)
    np.testing.assert_array_equal(remote.affine, local.affine)
    assert remote.modality == "CT"
    assert len(remote.series) == 20


def test_studies_and_searches_name_their_series(series: str, orthanc: Orthanc) -> None:
    study_uri = series.rsplit("/series/", 1)[0]
    assert dicomweb.find_series(study_uri) == [series]
    assert dicomweb.find_series(f"{orthanc.dicomweb}/series?Modality=CT") == [series]
    assert dicomweb.find_series(f"{orthanc.dicomweb}/series?Modality=MR") == []


def test_segment_reads_by_uri_and_stores_the_seg_once(
    series: str, orthanc: Orthanc, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom

    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    out = tmp_path / "seg"
    flags = ["--fast", "-d", "cpu", "-q", "-ot", "nifti", "dicom_seg", "--dicomweb_store", orthanc.dicomweb]
    for _ in range(2):  # the second run finds the SEG there and stores nothing
        assert main(["segment", "-i", series, "-o", str(out), *flags]) == 0
    study = series.split("/studies/")[1].split("/")[0]
    series_found = orthanc.get(f"/studies/{_orthanc_id(orthanc, study)}/series")
    segs = [s for s in series_found if s["MainDicomTags"].get("Modality") == "SEG"]
    assert len(segs) == 1
    assert len(segs[0]["Instances"]) == 1
    blob = orthanc.get_bytes(f"/instances/{segs[0]['Instances'][0]}/file")
    stored, written = pydicom.dcmread(io.BytesIO(blob)), pydicom.dcmread(out / "segmentation_seg.dcm")
    assert stored.SOPInstanceUID == written.SOPInstanceUID
    assert stored.StudyInstanceUID == study
    assert_seg_is_the_nifti(blob, out / "segmentation.nii.gz")


def test_without_o_only_the_server_receives_the_outputs(
    series: str, orthanc: Orthanc, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    flags = ["--fast", "-d", "cpu", "-q", "-ot", "dicom_seg", "--dicom_seg_type", "labelmap"]
    assert main(["segment", "-i", series, *flags, "--dicomweb_store", orthanc.dicomweb]) == 0
    modalities = [s["MainDicomTags"].get("Modality") for s in orthanc.get("/series?expand")]
    assert sorted(modalities) == ["CT", "SEG"]
    assert not list(tmp_path.glob("**/*.dcm"))
    # The Python API without an output: the image comes back, the (BINARY) SEG goes to the server.
    img = raytseg.segment(
        series, fast=True, device="cpu", output_type=["dicom_seg"], dicomweb_store=orthanc.dicomweb
    )
    assert img.shape == (512, 512, 20)
    modalities = [s["MainDicomTags"].get("Modality") for s in orthanc.get("/series?expand")]
    assert sorted(modalities) == ["CT", "SEG", "SEG"]
    assert (
        main(["segment", "-i", series, "-ot", "nifti", "dicom_seg", "--dicomweb_store", orthanc.dicomweb])
        == 1
    )


def test_wrong_credentials_are_refused_at_once(series: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYTSEG_DICOMWEB_PASSWORD", "not-the-password")
    with pytest.raises(StorageError, match="401.*RAYTSEG_DICOMWEB_TOKEN") as info:
        load_volume(series, LIMITS)
    assert not is_transient(info.value)
    assert "not-the-password" not in str(info.value)


def test_an_unknown_series_is_a_clear_error(series: str) -> None:
    with pytest.raises(Exception, match="Check the") as info:
        load_volume(series.rsplit("/", 1)[0] + "/1.2.3.4", LIMITS)
    assert not is_transient(info.value)


def test_a_stopped_server_is_a_transient_error_and_storing_retries(
    series: str, orthanc: Orthanc, reference_data: Path
) -> None:
    _, _, blobs = series_with_uids(reference_data / "example_ct_dicom", "another-study")
    orthanc.stop()
    with pytest.raises(StorageError, match="Could not reach") as info:
        load_volume(series, LIMITS)
    assert is_transient(info.value)
    import threading

    threading.Timer(1.5, orthanc.start).start()  # back while the store is retrying
    stored = dicomweb.store(orthanc.dicomweb, blobs[:2], RetryPolicy(retries=6, delay_s=0.5))
    assert len(stored) == 2
    assert len(orthanc.get("/instances")) == 22


def _orthanc_id(orthanc: Orthanc, study_uid: str) -> str:
    found = orthanc.post_json("/tools/lookup", study_uid)
    return str(next(f["ID"] for f in found if f["Type"] == "Study"))
