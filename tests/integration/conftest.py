"""Fixtures shared by the integration tests: moto's standalone S3 server and Orthanc (a
DICOMweb server), both on 127.0.0.1.

Clients reach it the standard way: ``AWS_ENDPOINT_URL`` (honoured by botocore >= 1.31 and
therefore by s3fs) plus dummy credentials, with the AWS config files pointed at nothing.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import missing_deploy_tool

# Ports handed to the servers the tests start (Serve's proxy, Orthanc, metrics...): from
# below the kernel's ephemeral range and above Ray's worker ports (10002-19999). A port
# the kernel hands out for bind(0) is free only until another process binds one, and Ray's
# processes bind ephemeral ports all the time: a CI run lost Serve's proxy port that way.
_PORTS = range(20_000, 32_768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on, that the kernel gives no one by chance, not handed out
    before in this session."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = [p for p in _PORTS if p < low and p not in _handed_out]
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"No free port in {_PORTS} below the ephemeral range (from {low})")


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


@pytest.fixture
def s3(
    s3_client_env: Callable[[Path], dict[str, str]],
    s3_bucket: Callable[[str], AbstractContextManager[Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Any]:
    """An s3fs filesystem on the moto server with the test module's ``BUCKET`` made. The
    environment sends this process's S3 clients there, and those of the processes it starts
    (a local Ray's workers), with dummy credentials and no AWS config files."""
    for name, value in s3_client_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    with s3_bucket(request.module.BUCKET) as fs:
        yield fs


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


# --- outages: a server stopped for a while, then started again --------------------------


class Stoppable(Protocol):
    def stop(self) -> None: ...
    def start(self) -> None: ...


class Outage:
    """``server`` stopped for ``seconds`` once ``begins()`` is true (checked in a thread);
    ``restarted_at`` is the wall-clock time it answered again (None: it never went down)."""

    def __init__(self, server: Stoppable, begins: Callable[[], bool], seconds: float) -> None:
        self.restarted_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(server, begins, seconds), daemon=True)
        self._thread.start()

    def _run(self, server: Stoppable, begins: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + 300
        while not begins() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        time.sleep(seconds)
        server.start()
        self.restarted_at = time.time()

    def join(self) -> float:
        """When the server answered again; fails the test if the outage never happened."""
        self._thread.join(timeout=60)
        assert self.restarted_at is not None, "the outage never happened"
        return self.restarted_at


class StoppableS3:
    """A moto S3 server on a port of its own. It shares the data of every moto server of
    this process (moto keeps it in memory here), so stopping it is an outage of the
    storage, and starting it again finds every object where it was."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module")
def stoppable_s3() -> Iterator[StoppableS3]:
    pytest.importorskip("moto.server")
    server = StoppableS3()
    try:
        yield server
    finally:
        server.stop()


# --- Orthanc: a real DICOMweb server ---------------------------------------------------

ORTHANC_USER, ORTHANC_PASSWORD = "raytseg", "orthanc-test-password-3141"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


class Orthanc:
    """Debian's Orthanc with its DICOMweb plugin, on 127.0.0.1 with a throwaway storage
    folder and basic auth; ``stop()`` and ``start()`` keep its port and its studies."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(self._settings(folder)))
        self.log = folder / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The server's DICOMweb root as raytseg names it."""
        return f"dicomweb+{self.url}/dicom-web"

    def start(self) -> None:
        import requests

        with self.log.open("ab") as log:
            self._process = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start; see {self.log}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
            self._process = None

    @property
    def auth(self) -> tuple[str, str]:
        return ORTHANC_USER, ORTHANC_PASSWORD

    def upload(self, blobs: list[bytes]) -> None:
        import requests

        for blob in blobs:
            requests.post(f"{self.url}/instances", data=blob, auth=self.auth, timeout=30).raise_for_status()

    def get(self, path: str) -> Any:
        """Orthanc's REST answer (JSON) for ``path``."""
        return json.loads(self.get_bytes(path))

    def get_bytes(self, path: str) -> bytes:
        import requests

        answer = requests.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        answer.raise_for_status()
        return answer.content

    def post_json(self, path: str, body: str) -> Any:
        import requests

        answer = requests.post(f"{self.url}{path}", data=body, auth=self.auth, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def _settings(self, folder: Path) -> dict[str, Any]:
        return {
            "Name": "raytseg-tests",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # 127.0.0.1 only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "DicomServerEnabled": False,
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }


@pytest.fixture
def orthanc_port() -> int | None:
    """The port the ``orthanc`` fixture serves on (None: any free one)."""
    return None


@pytest.fixture
def orthanc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, orthanc_port: int | None) -> Iterator[Orthanc]:
    """A running Orthanc; raytseg in this process reaches it with basic auth from the environment."""
    if shutil.which("Orthanc") is None or not Path(ORTHANC_DICOMWEB_PLUGIN).exists():
        missing_deploy_tool("No Orthanc with its DICOMweb plugin")
    (tmp_path / "orthanc").mkdir()
    server = Orthanc(tmp_path / "orthanc", orthanc_port)
    monkeypatch.setenv("RAYTSEG_DICOMWEB_USER", ORTHANC_USER)
    monkeypatch.setenv("RAYTSEG_DICOMWEB_PASSWORD", ORTHANC_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def assert_seg_is_the_nifti(seg: bytes, multilabel_path: Path) -> None:
    """The DICOM-SEG ``seg``, decoded by the independent reader, has exactly the voxels of
    the multilabel NIfTI, segment by segment (matched by class name)."""
    import nibabel as nib
    import numpy as np

    from raytseg.pipeline.labeltable import read_label_table
    from raytseg.testing import seg_masks

    multilabel = nib.load(multilabel_path)
    labels = np.asarray(multilabel.dataobj)
    number = {name: k for k, name in read_label_table(multilabel).items()}
    masks = seg_masks(seg, multilabel.affine, multilabel.shape)
    assert masks, "the random-weight network predicted no class"
    rebuilt = np.zeros_like(labels)
    for name, mask in masks.items():
        assert not rebuilt[mask].any(), f"{name} overlaps another segment"
        rebuilt[mask] = number[name]
    np.testing.assert_array_equal(rebuilt, labels)


def series_with_uids(folder: Path, salt: str) -> tuple[str, str, list[bytes]]:
    """The slices of ``folder`` with study, series and instance UIDs filled (the reference
    series has empty ones, which a PACS refuses): (study UID, series UID, Part 10 bytes)."""
    import io

    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    study, series = generate_uid(entropy_srcs=[salt, "study"]), generate_uid(entropy_srcs=[salt, "series"])
    blobs = []
    for path in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(path)
        sop = generate_uid(entropy_srcs=[salt, path.name])
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = study, series, sop
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
        dataset.file_meta.MediaStorageSOPInstanceUID = sop
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        blobs.append(buffer.getvalue())
    return study, series, blobs


@dataclass(frozen=True)
class Prometheus:
    """A Prometheus server's query API."""

    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        import httpx

        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert answer.status_code == 200, f"{expr}: {body}"
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0


@contextmanager
def prometheus_server(binary: str, config: dict[str, Any], work: Path) -> Iterator[Prometheus]:
    """Debian's Prometheus on 127.0.0.1 with ``config`` (prometheus.yml as a dict), its data
    in ``work``; stopped afterwards."""
    import httpx
    import yaml

    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = (work / "prometheus.log").open("w")
    args = [
        binary,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
        "--log.level=warn",
    ]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        assert process.poll() is None, (work / "prometheus.log").read_text()
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert time.monotonic() < deadline, "Prometheus did not start"
            time.sleep(0.5)
        yield Prometheus(url)
    finally:
        stop_process(process, timeout_s=20)
        log.close()


def stop_process(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
