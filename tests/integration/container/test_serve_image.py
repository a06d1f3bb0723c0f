"""raytseg's image run as ``docker run`` runs it: ``raytseg serve`` (the image's command) with
weights mounted read-only. Ready within the chart's budget, the same masks, radiomics and 3D
preview as ``raytseg segment`` outside the container, its HEALTHCHECK passing, stopped
cleanly by SIGTERM with a request in flight answered; and the image itself: uid 1000, no
weights, compilers or secrets."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import pytest
import yaml

from tests.conftest import wait_until
from tests.integration.conftest import free_port
from tests.integration.container.conftest import REPO, Docker, Image, readable_copy

EXAMPLE_CT = REPO / "examples" / "data" / "example_ct_sm.nii.gz"
SERVE_PORT = 8000  # the image's HEALTHCHECK asks this port (containers share the host's network)
SERVE_CONFIG = (
    "tasks: {total: {modes: [fast]}}\ntorch_threads: 1\npool: {enabled: false}\njobs: {enabled: false}\n"
    "models: {num_cpus: 0.25}\npreprocess: {num_cpus: 0.25}\npostprocess: {num_cpus: 0.25}\n"
    "ingress: {num_cpus: 0.25}\n"
)


def readyz_budget_s() -> float:
    """The chart's wait for /readyz (`helm test`), the longest it lets a new install take."""
    values = yaml.safe_load((REPO / "helm" / "raytseg" / "values.yaml").read_text())
    return float(values["tests"]["readyzTimeoutSeconds"])


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """weights/ (the fast total model, random weights) and config/serve.yaml, readable by uid 1000."""
    from raytseg.weights.synth import synthesize_task

    made = tmp_path_factory.mktemp("made")
    synthesize_task("total", made / "weights", fast=True, tiny=True)
    (made / "config").mkdir()
    (made / "config" / "serve.yaml").write_text(SERVE_CONFIG)
    with readable_copy(made) as shared:
        yield shared


def cli_outputs(image: bytes, weights: Path, folder: Path, *flags: str) -> Path:
    """``raytseg segment --fast`` with ``flags`` on this machine, outside any container: the
    multilabel file (``--ml``) or the output folder."""
    ml = "--ml" in flags
    source, out = folder / "ct.nii.gz", folder / ("cli.nii.gz" if ml else "cli")
    source.write_bytes(image)
    args = [sys.executable, "-m", "raytseg.cli", "segment", "-i", str(source), "-o", str(out), "--fast"]
    env = {"RAYTSEG_WEIGHTS": str(weights), "PATH": "/usr/bin:/bin", "HOME": str(folder)}
    done = subprocess.run([*args, *flags], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def cli_segmentation(image: bytes, weights: Path, folder: Path) -> bytes:
    """``raytseg segment --fast --ml``'s file."""
    return cli_outputs(image, weights, folder, "--ml").read_bytes()


def assert_tools_answer_as_the_cli(url: str, ct: bytes, weights: Path, folder: Path) -> None:
    """The image's radiomics (pyradiomics, built without a compiler in the image) and 3D
    preview (VTK through OSMesa: no display in a container): the CLI's files, byte for byte."""
    params = {"fast": "true", "ml": "false", "radiomics": "true", "preview": "true"}
    answer = httpx.post(f"{url}/v1/segment", params=params, content=ct, timeout=300)
    assert answer.status_code == 200, answer.text
    served = zipfile.ZipFile(io.BytesIO(answer.content))
    cli = cli_outputs(ct, weights, folder, "-r", "-p")
    radiomics = json.loads(served.read("statistics_radiomics.json"))
    assert any(features["shape_VoxelVolume"] > 0 for features in radiomics.values())  # masks measured
    for name in ("statistics_radiomics.json", "preview_total.png"):
        assert served.read(name) == (cli / name).read_bytes(), name


def tiny_ct() -> bytes:
    img: Any = nib.load(EXAMPLE_CT)
    return gzip.compress(img.slicer[40:64, 40:64, 10:20].to_bytes(), mtime=0)


def serve_args(image: Image, mounts: Path) -> list[str]:
    """The image's own command; the deployment's choices as `docker run` options."""
    return [
        "--network=host",
        "--shm-size=1g",  # Ray's object store (KubeRay mounts a memory-backed /dev/shm)
        "--health-interval=5s",  # the image's check, asked more often than every 30 s
        f"--volume={mounts / 'weights'}:/weights:ro",
        f"--volume={mounts / 'config'}:/config:ro",
        "--env=RAYTSEG_WEIGHTS=/weights",
        "--env=RAYTSEG_SERVE_CONFIG=/config/serve.yaml",
        f"--env=RAYTSEG_SERVE__HTTP__METRICS_EXPORT_PORT={free_port()}",
        image.tag,
    ]


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def health(docker: Docker, name: str) -> str:
    state: dict[str, Any] = json.loads(docker("inspect", "--format", "{{json .State}}", name))
    return str(state["Health"]["Status"])


def test_image_serves_like_the_cli_and_stops_on_sigterm(
    docker: Docker, image: Image, mounts: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{SERVE_PORT}"
    assert not ready(url), f"something already answers on port {SERVE_PORT}"
    started = time.monotonic()
    with docker.container(*serve_args(image, mounts)) as name:
        try:
            wait_until(lambda: ready(url), readyz_budget_s(), "/readyz of the container")
        except AssertionError:
            raise AssertionError(docker.logs(name)) from None
        print(f"\n{image.tag}: ready in {time.monotonic() - started:.1f} s")
        ct = tiny_ct()
        answer = httpx.post(f"{url}/v1/segment", params={"fast": "true"}, content=ct, timeout=300)
        assert answer.status_code == 200, answer.text
        assert answer.content == cli_segmentation(ct, mounts / "weights", tmp_path)
        assert_tools_answer_as_the_cli(url, ct, mounts / "weights", tmp_path)
        wait_until(lambda: health(docker, name) == "healthy", 60, "the image's HEALTHCHECK")
        with ThreadPoolExecutor(1) as pool:
            full = EXAMPLE_CT.read_bytes()
            post = partial(httpx.post, f"{url}/v1/segment", params={"fast": "true"}, timeout=300)
            in_flight = pool.submit(post, content=full)
            time.sleep(1.0)
            stopping = time.monotonic()
            docker("stop", "--time=120", name, timeout=180)  # SIGTERM; SIGKILL after 120 s
            stopped_s = time.monotonic() - stopping
            assert in_flight.result().status_code == 200
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name))
        assert (state["ExitCode"], state["OOMKilled"]) == (0, False), docker.logs(name)
        assert stopped_s < 120, f"stopped by SIGKILL after {stopped_s:.0f} s, not by SIGTERM"


def test_image_runs_as_uid_1000_without_weights_compilers_or_secrets(docker: Docker, image: Image) -> None:
    script = (
        "id -u; id -g; "
        "for c in gcc cc g++ c++ clang make; do command -v $c; done; "
        # nnU-Net model folders and checkpoints, any large model file, credentials files
        "find / -xdev \\( -type d -name 'Dataset[0-9][0-9][0-9]_*' -o -name 'checkpoint_*.pth' "
        "-o -size +10M \\( -name '*.pth' -o -name '*.pt' -o -name '*.zip' -o -name '*.onnx' \\) "
        "-o -name credentials -o -name .netrc -o -path '/home/*' -name '*.pem' \\) -print 2>/dev/null; "
        "env | grep -i -E 'token|secret|password|aws_' || true"
    )
    out = docker("run", "--rm", "--network=none", "--entrypoint=/bin/bash", image.tag, "-c", script)
    lines = out.splitlines()
    assert lines[:2] == ["1000", "100"], out
    assert lines[2:] == [], f"found in the image: {lines[2:]}"
