"""Fixtures shared by the integration tests: moto's standalone S3 server on 127.0.0.1.

Clients reach it the standard way: ``AWS_ENDPOINT_URL`` (honoured by botocore >= 1.31 and
therefore by s3fs) plus dummy credentials, with the AWS config files pointed at nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_client_env(moto_endpoint: str) -> Callable[[Path], dict[str, str]]:
    """``env(folder)``: the variables that send S3 clients to the moto server; ``folder``
    receives the (never created) AWS config paths."""

    def env(folder: Path) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": moto_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    return env


@pytest.fixture(scope="session")
def s3_bucket() -> Callable[[str], AbstractContextManager[Any]]:
    """``with s3_bucket(name) as fs``: an s3fs filesystem configured by the current
    environment, with that bucket made; s3fs's instance cache is cleared before and after,
    so no client made for another endpoint or credentials is reused."""

    @contextmanager
    def bucket(name: str) -> Iterator[Any]:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        if not fs.exists(name):
            fs.mkdir(name)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()

    return bucket


@pytest.fixture(scope="session")
def dicom_zip_bomb(tmp_path_factory: pytest.TempPathFactory, reference_data: Path) -> Path:
    """The reference DICOM series zipped with one more member that expands to 3 GiB of
    zeros: a 6 MB upload that a reader of every member would expand to over 3 GB."""
    import zipfile

    bomb = tmp_path_factory.mktemp("bomb") / "series.zip"
    chunk = bytes(64 << 20)
    padding = zipfile.ZipInfo("zz_padding.dcm")
    padding.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for slice_file in sorted((reference_data / "example_ct_dicom").iterdir()):
            archive.write(slice_file, slice_file.name)
        with archive.open(padding, "w", force_zip64=True) as member:
            for _ in range(3 * (1 << 30) // len(chunk)):
                member.write(chunk)
    return bomb
