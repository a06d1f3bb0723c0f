"""One Serve app on a local Ray (CPU, tiny synthetic weights), shared by the module's tests.

The app (over ten replicas, several GB) is package-scoped (this folder is a package for
that reason): it starts once for the folder's tests and stops when the last of them is done,
so it never lives on through the rest of the session (the reference tests, the unit tests).
Once, not once per module: every start of a local Ray on a busy 2-core machine risks Ray's
fixed 30 s wait for its raylet ("The current node timed out during startup"), which a CI
run hit on its second of seven starts.

The app serves ``total`` (default and fast) with dedicated model deployments, and the
multiplexed pool for the 6 mm crop model that ``roi_subset`` needs and for ``total_mr``
fast (MR DICOM uploads with task ``total`` run it; so does ``/v1/modality`` with
``normalized_intensities``) and ``headneck_bones_vessels`` (``/v1/phase``). Its limits are small
so the 413/429 paths are cheap to reach. The reference for every comparison is the
in-process pipeline (``raytseg.pipeline.run.Segmenter``) on the same weights.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray.serve")

from raytseg.config import Settings  # noqa: E402
from raytseg.pipeline.export import multilabel_nifti_bytes  # noqa: E402
from raytseg.pipeline.load import LoadLimits, load_volume  # noqa: E402
from raytseg.pipeline.records import SegmentOptions  # noqa: E402
from raytseg.serve.config import ServeConfig, load_config  # noqa: E402
from tests.integration.conftest import ORTHANC_PASSWORD, ORTHANC_USER, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_CT = REPO / "examples" / "data" / "example_ct_sm.nii.gz"
TOKEN = "integration-test-token-0123456789"
MAX_BODY = 8 * 2**20
MAX_QUEUED = 4


@dataclass(frozen=True)
class Service:
    url: str
    metrics_url: str
    config: ServeConfig
    weights: Path
    jobs_dir: Path
    ray_dir: Path
    dicomweb_port: int  # the allow-list admits a DICOMweb server on this port (started by a test)

    def client(self, token: str | None = TOKEN, timeout: float = 300.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def wait_for_job(api: httpx.Client, job_id: str, timeout_s: float = 180) -> dict[str, Any]:
    """The job's record once it succeeded or failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
        if record["state"] in ("succeeded", "failed"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, tiny=True)
    synthesize_task("total", root, fast=True, tiny=True)
    # Served by the pool: total_mr for the MR rule and get-modality -n, the neck for get-phase.
    synthesize_task("total_mr", root, fast=True, tiny=True)
    synthesize_task("headneck_bones_vessels", root, tiny=True)
    return root


@pytest.fixture(scope="package")
def service(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    import ray

    from raytseg.serve.local import metrics_url, start_local, stop_local

    if ray.is_initialized():
        pytest.skip("Another test left Ray running in this process")

    base = tmp_path_factory.mktemp("serve")
    (base / "tokens").write_text(f"# test token\n{TOKEN}\n")
    jobs_dir = base / "jobs"
    jobs_dir.mkdir()
    small = {"num_cpus": 0.25}
    dicomweb_port = free_port()
    config = load_config(
        {
            "device": "cpu",
            "torch_threads": 1,
            "weights": str(weights),
            "tasks": {
                "total": {"modes": ["default", "fast"]},
                "total_mr": {"modes": ["fast"], "dedicated": False},
                "headneck_bones_vessels": {"modes": ["default"], "dedicated": False},
            },
            "models": {**small, "num_gpus": 0, "health_check_period_s": 2},
            "pool": {**small, "num_gpus": 0},
            "preprocess": small,
            "postprocess": small,
            "ingress": small,
            "limits": {
                "max_body_bytes": MAX_BODY,
                "max_queued_requests": MAX_QUEUED,
                "overload_status": 429,
                "retry_after_s": 2,
            },
            "auth": {"token_file": str(base / "tokens"), "required": True},
            "jobs": {
                "allowed_prefixes": [
                    str(jobs_dir),
                    "memory://raytseg-jobs/",
                    f"dicomweb+http://127.0.0.1:{dicomweb_port}/dicom-web/",
                ]
            },
            "http": {"port": free_port(), "metrics_export_port": free_port()},
        },
        {},
    )
    # A short private Ray temp dir (socket paths are length-limited): its replica logs are ours.
    ray_dir = Path(tempfile.mkdtemp(prefix="rts", dir="/tmp"))
    patch = pytest.MonkeyPatch()
    # The test Orthanc's credentials, in the environment the replicas inherit from Ray.
    patch.setenv("RAYTSEG_DICOMWEB_USER", ORTHANC_USER)
    patch.setenv("RAYTSEG_DICOMWEB_PASSWORD", ORTHANC_PASSWORD)
    try:
        started = start_local(
            config,
            num_cpus=4,
            object_store_memory=500_000_000,
            log_to_driver=False,  # replica logs stay in <ray_dir>/session_*/logs/serve
            _temp_dir=str(ray_dir),
            _system_config={"metrics_report_interval_ms": 1000},
        )
        yield Service(started.url, metrics_url() or "", config, weights, jobs_dir, ray_dir, dicomweb_port)
    finally:
        patch.undo()
        stop_local()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def api(service: Service) -> Iterator[httpx.Client]:
    with service.client() as client:
        yield client


@pytest.fixture(scope="session")
def reference(weights: Path) -> Callable[[bytes, SegmentOptions], bytes]:
    """The in-process pipeline's multilabel NIfTI bytes for an upload and options."""
    import torch

    from raytseg.pipeline.run import Segmenter
    from raytseg.weights.store import WeightsStore

    settings = Settings.from_env().model_copy(update={"weights_dir": weights, "weights_uri": None})
    segmenter = Segmenter(WeightsStore(settings), torch.device("cpu"))
    limits = LoadLimits.from_settings(settings)

    def run(data: bytes, options: SegmentOptions) -> bytes:
        return multilabel_nifti_bytes(segmenter.segment(load_volume(data, limits), options))

    return run


def nifti_gz(img: nib.Nifti1Image) -> bytes:
    return gzip.compress(img.to_bytes(), mtime=0)


@pytest.fixture(scope="session")
def ct() -> bytes:
    """The example CT (122 x 101 x 30 at 3 mm)."""
    return EXAMPLE_CT.read_bytes()


@pytest.fixture(scope="session")
def small_ct() -> bytes:
    """A corner of the example CT: quick enough for the five 1.5 mm ``total`` parts."""
    img: Any = nib.load(EXAMPLE_CT)
    return nifti_gz(img.slicer[30:70, 30:70, 10:26])


@pytest.fixture(scope="session")
def tiny_ct() -> bytes:
    """An even smaller corner: the cheapest good request (``--fast``)."""
    img: Any = nib.load(EXAMPLE_CT)
    return nifti_gz(img.slicer[40:64, 40:64, 10:20])


def image_bytes(shape: tuple[int, ...], zooms: tuple[float, ...] = (3.0, 3.0, 3.0)) -> bytes:
    data = np.zeros(shape, dtype=np.int16)
    affine = np.diag([*zooms[:3], 1.0])
    return nifti_gz(nib.Nifti1Image(data, affine))


@pytest.fixture(scope="session")
def make_image() -> Callable[..., bytes]:
    return image_bytes


def as_image(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


@pytest.fixture(scope="session")
def read_image() -> Callable[[bytes], nib.Nifti1Image]:
    return as_image


def zip_of(members: dict[str, bytes]) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def make_zip() -> Callable[[dict[str, bytes]], bytes]:
    return zip_of


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample on the node's metrics endpoint: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


@pytest.fixture(scope="package")
def metrics(service: Service) -> Callable[[], Samples]:
    assert service.metrics_url, "the node reports no metrics export port"
    return lambda: scrape(service.metrics_url)


@pytest.fixture(scope="session")
def metric_total() -> Callable[..., float]:
    return total


# Serve's access log line of a finished call: "... <request id> -- CALL predict OK 1234.5ms"
_CALL = re.compile(
    r"^\S+ (?P<date>\S+ \S+) (?P<who>\S+) \S+ (?P<request>\S+) -- CALL (?P<method>\w+) OK (?P<ms>[\d.]+)ms"
)


def calls_of(ray_dir: Path, request_id: str) -> dict[str, list[tuple[float, float]]]:
    """(start, end) in seconds of each replica call made for one request, by deployment."""
    from datetime import datetime

    found: dict[str, list[tuple[float, float]]] = {}
    for log in ray_dir.glob("session_2*/logs/serve/replica_*.log"):  # not session_latest, a link
        for line in log.read_text(errors="replace").splitlines():
            match = _CALL.match(line)
            if match is None or match["request"] != request_id:
                continue
            end = datetime.strptime(match["date"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            deployment = match["who"].split("_", 1)[1]
            found.setdefault(deployment, []).append((end - float(match["ms"]) / 1000, end))
    return found


@pytest.fixture(scope="package")
def replica_calls(service: Service) -> Callable[[str], dict[str, list[tuple[float, float]]]]:
    return lambda request_id: calls_of(service.ray_dir, request_id)
