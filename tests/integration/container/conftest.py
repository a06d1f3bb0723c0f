"""A Docker engine and raytseg's CPU image, built from the Dockerfile (scripts/build-image.sh).

The engine is the one ``docker`` reaches already, else a ``dockerd`` started here for the
session (root; Debian's docker.io, scripts/setup-ci-tools.sh) with what this machine allows:
no iptables, no bridge, so containers share the host's network and every port the tests use
comes from ``free_port()``. Its images live in ``.cache/docker``: a second local run reuses
the base and the build's layers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import missing_deploy_tool
from tests.integration.conftest import stop_process

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Docker:
    """The ``docker`` command against the session's engine."""

    env: dict[str, str]
    ours: bool = False  # started by this session, its images in .cache/docker

    def __call__(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout.strip()

    def answers(self) -> bool:
        done = subprocess.run(["docker", "info"], env=self.env, capture_output=True, timeout=30)
        return done.returncode == 0

    @contextmanager
    def container(self, *run_args: str) -> Iterator[str]:
        """``docker run -d`` a container named for the test; removed (with its logs) after."""
        name = f"raytseg-test-{uuid.uuid4().hex[:8]}"
        self("run", "-d", "--name", name, *run_args)
        try:
            yield name
        finally:
            subprocess.run(["docker", "rm", "-f", name], env=self.env, capture_output=True, timeout=60)

    def logs(self, name: str) -> str:
        done = subprocess.run(["docker", "logs", name], env=self.env, capture_output=True, text=True)
        return (done.stdout + done.stderr)[-4000:]


def _start_engine(run_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    socket = run_dir / "docker.sock"
    args = [
        "dockerd",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        f"--data-root={REPO / '.cache' / 'docker'}",
        f"--exec-root={run_dir / 'exec'}",
        f"--pidfile={run_dir / 'dockerd.pid'}",
        f"--host=unix://{socket}",
    ]
    with open(run_dir / "dockerd.log", "wb") as log:
        engine = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    return engine, {**os.environ, "DOCKER_HOST": f"unix://{socket}"}


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    if shutil.which("docker") is None:
        missing_deploy_tool("No docker command")
    present = Docker(dict(os.environ))
    if present.answers():
        yield present
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        missing_deploy_tool("No Docker engine, and none can be started here (dockerd, as root)")
    run_dir = Path(tempfile.mkdtemp(prefix="rtd-", dir="/tmp"))  # short: sockets live here
    engine, env = _start_engine(run_dir)
    ours = Docker(env, ours=True)
    try:
        deadline = time.monotonic() + 60
        while not ours.answers():
            if engine.poll() is not None or time.monotonic() > deadline:
                log = (run_dir / "dockerd.log").read_text()[-3000:]
                raise AssertionError(f"dockerd did not start:\n{log}")
            time.sleep(0.5)
        yield ours
    finally:
        stop_process(engine, timeout_s=60)
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass(frozen=True)
class Image:
    tag: str
    size_bytes: int
    build_s: int


@pytest.fixture(scope="session")
def image(docker: Docker) -> Image:
    """raytseg's CPU image, built by scripts/build-image.sh from the runtime venv's lock."""
    if not (REPO / ".cache" / "runtime-venv" / "bin" / "pip").exists():
        missing_deploy_tool("No .cache/runtime-venv, the image's package lock")
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh")],
        env=docker.env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    if docker.ours:  # the images earlier builds left untagged (3 GB each)
        docker("image", "prune", "--force")
    _, tag, size, seconds = done.stdout.strip().splitlines()[-1].split()
    return Image(tag, int(size), int(seconds))


@contextmanager
def readable_copy(source: Path) -> Iterator[Path]:
    """A copy of ``source`` that every user can read (the containers' uid 1000), for read-only
    mounts: pytest's own folders are root's alone. Removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="raytseg-mount-", dir="/tmp"))
    try:
        target = Path(shutil.copytree(source, parent / "mount"))
        make_readable(parent)
        yield target
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def make_readable(root: Path) -> None:
    """``root`` and everything under it readable by every user (the containers' uid 1000)."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
