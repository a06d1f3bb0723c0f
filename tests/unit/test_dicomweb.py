"""DICOMweb URIs, credentials and the options that use them (no server: see
tests/integration/test_dicomweb.py for Orthanc)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from raytseg.config import dicomweb_headers
from raytseg.dicomweb import DicomwebLocation, find_series, is_dicomweb, parse, store
from raytseg.errors import InvalidOptionError
from raytseg.options import split_options
from raytseg.pipeline.export import check_target

SERVER = "dicomweb+https://pacs.example.org:8443/dicom-web"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (SERVER, DicomwebLocation("https://pacs.example.org:8443/dicom-web")),
        (f"{SERVER}/", DicomwebLocation("https://pacs.example.org:8443/dicom-web")),
        ("dicomweb+http://h", DicomwebLocation("http://h")),
        (f"{SERVER}/studies/1.2.3/series/4.5", DicomwebLocation(SERVER[9:], "1.2.3", "4.5")),
        (f"{SERVER}/studies/1.2.3", DicomwebLocation(SERVER[9:], "1.2.3")),
        (
            f"{SERVER}/studies/1.2.3/series?Modality=CT",
            DicomwebLocation(SERVER[9:], "1.2.3", filters=(("Modality", "CT"),)),
        ),
        (
            f"{SERVER}/series?Modality=CT&StudyDate=20200101-",
            DicomwebLocation(
                SERVER[9:], all_series=True, filters=(("Modality", "CT"), ("StudyDate", "20200101-"))
            ),
        ),
    ],
)
def test_the_uri_forms(uri: str, expected: DicomwebLocation) -> None:
    assert is_dicomweb(uri)
    assert parse(uri) == expected


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("https://pacs/dicom-web/studies/1/series/2", "is not a DICOMweb URI"),
        ("dicomweb+https://user:secret@pacs/dicom-web", "must not hold credentials"),
        (f"{SERVER}?Modality=CT", "belong after '/series'"),
        (f"{SERVER}/studies/1.2/series/3.4?x=1", "belong after '/series'"),
        (f"{SERVER}/studies/not-a-uid", "not a DICOMweb URI that raytseg understands"),
        ("dicomweb+https:///dicom-web", "not a DICOMweb URI that raytseg understands"),
    ],
)
def test_malformed_uris_are_refused_with_the_forms(uri: str, problem: str) -> None:
    with pytest.raises(InvalidOptionError, match=problem) as info:
        parse(uri)
    assert "secret" not in str(info.value)


def test_a_server_is_no_input_and_a_series_no_store() -> None:
    with pytest.raises(InvalidOptionError, match="names a server"):
        find_series(SERVER)
    assert find_series(f"{SERVER}/studies/1.2/series/3.4") == [f"{SERVER}/studies/1.2/series/3.4"]
    with pytest.raises(InvalidOptionError, match="server URI"):
        store(f"{SERVER}/studies/1.2", [])


def test_credentials_from_the_environment_or_a_mounted_file(tmp_path: Path) -> None:
    assert dicomweb_headers({}) == {}
    assert dicomweb_headers({"RAYTSEG_DICOMWEB_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    secret = tmp_path / "password"
    secret.write_text("pa:ss\n")
    basic = dicomweb_headers({"RAYTSEG_DICOMWEB_USER": "me", "RAYTSEG_DICOMWEB_PASSWORD_FILE": str(secret)})
    assert base64.b64decode(basic["Authorization"].split()[1]) == b"me:pa:ss"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert dicomweb_headers({"RAYTSEG_DICOMWEB_TOKEN_FILE": str(token_file)})["Authorization"].endswith(
        "from-file"
    )
    with pytest.raises(InvalidOptionError, match="RAYTSEG_DICOMWEB_TOKEN_FILE"):
        dicomweb_headers({"RAYTSEG_DICOMWEB_TOKEN_FILE": str(tmp_path / "missing")})


def test_dicomweb_store_needs_a_server_and_a_dicom_output() -> None:
    _, output = split_options({"output_type": ("dicom_seg",), "dicomweb_store": SERVER})
    assert output.dicomweb_store == SERVER
    with pytest.raises(InvalidOptionError, match="add -ot dicom_seg"):
        split_options({"dicomweb_store": SERVER})
    with pytest.raises(InvalidOptionError, match="must name a DICOMweb server"):
        split_options({"output_type": ("dicom_seg",), "dicomweb_store": f"{SERVER}/studies/1.2"})


def test_without_a_target_only_dicom_outputs_may_be_asked_for() -> None:
    _, stored = split_options({"output_type": ("dicom_seg",), "dicomweb_store": SERVER})
    check_target(None, stored, statistics=False)
    check_target("out", stored, statistics=True)
    with pytest.raises(InvalidOptionError, match="give -o for NIfTI"):
        check_target(None, stored, statistics=True)
    _, both = split_options({"output_type": ("nifti", "dicom_seg"), "dicomweb_store": SERVER})
    with pytest.raises(InvalidOptionError, match="give -o for NIfTI"):
        check_target(None, both, statistics=False)
    _, files = split_options({})
    with pytest.raises(InvalidOptionError, match=r"output folder or file \(-o\)"):
        check_target(None, files, statistics=False)
