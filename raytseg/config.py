"""Settings, and the only module that reads the environment.

TotalSegmentator users already have weights and a license where TotalSegmentator put
them, so the same variables are honoured with the same precedence:

- ``TOTALSEG_WEIGHTS_PATH``: the weights folder itself (nnU-Net "results" layout);
- ``TOTALSEG_HOME_DIR``: TotalSegmentator's home; weights in ``<home>/nnunet/results``,
  the license in ``<home>/config.json``; default ``~/.totalsegmentator``
  (``/tmp/.totalsegmentator`` when HOME is ``/``, as in TotalSegmentator's images).

raytseg adds ``RAYTSEG_*`` variables; ``RAYTSEG_WEIGHTS`` (a folder or an fsspec URI such
as ``s3://bucket/prefix``) wins over the TotalSegmentator ones when set.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from raytseg.errors import InvalidOptionError

GITHUB_RELEASES = "https://github.com/wasserth/TotalSegmentator/releases/download"
LICENSE_SERVER = "https://backend.totalsegmentator.com:443"
# 512 x 512 x 2048: a whole-body CT at sub-millimetre slices. Loading needs 8 bytes per
# voxel (TotalSegmentator's float64 copy), so this is the 4 GB point; raise it knowingly.
DEFAULT_MAX_VOXELS = 512 * 512 * 2048
DEVICES = "cpu, gpu, gpu:N (e.g. gpu:1) or mps"
DEVICE_PATTERN = r"^(cpu|mps|gpu(:[0-9]+)?)$"  # also the Helm values schema's (tools/chart.py)


def check_device(name: str) -> str:
    """TotalSegmentator's ``-d`` values; the one check of a device name, for every entry point."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"device {name!r}: use {DEVICES}")
    return name


Device = Annotated[str, AfterValidator(check_device)]
# What runs the networks (pipeline/backends.py): auto picks the fastest one whose fidelity
# bound holds on the device.
Backend = Literal["auto", "torch", "openvino"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def check_backend(backend: str, device: str) -> None:
    """The one check of a config's backend against its device option (the service's and
    batch's); ``pipeline.backends.resolve`` checks the device a model actually got."""
    if backend == "openvino" and device != "cpu":
        raise ValueError("backend openvino runs on the CPU: set device cpu, or backend torch/auto")


class Settings(BaseModel):
    """Where raytseg finds weights and what it accepts; built once at the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    totalseg_home: Path = Field(description="TotalSegmentator home (license config.json lives here).")
    weights_dir: Path = Field(description="Local weights folder in nnU-Net results layout.")
    weights_uri: str | None = Field(
        default=None, description="Remote weights (s3://…, https://…zip); fetched into cache_dir."
    )
    cache_dir: Path = Field(description="Where remote weights and inputs are cached.")
    weights_base_url: str = Field(
        default=GITHUB_RELEASES, description="Base of TotalSegmentator's release URLs for downloads."
    )
    license_server: str = Field(default=LICENSE_SERVER, description="Server for licensed weights.")
    max_voxels: int = Field(default=DEFAULT_MAX_VOXELS, gt=0, description="Refuse larger images.")
    max_archive_bytes: int = Field(
        default=8 * 1024**3, gt=0, description="Refuse zips that expand past this many bytes."
    )
    cudnn_autotune: bool = Field(
        default=False,
        description=(
            "Let cuDNN time its algorithms for every convolution shape (nnU-Net's and TotalSegmentator's"
            " choice). Off, cuDNN picks by heuristics: the same kernels in every process, so the same masks"
            " run after run; on, masks can differ between processes in near-tie voxels."
        ),
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (RAY_ADDRESS, set by KubeRay for a RayJob)."
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from the environment (``os.environ`` unless given)."""
        env = os.environ if environ is None else environ
        home = _totalseg_home(env)
        weights = env.get("RAYTSEG_WEIGHTS")
        weights_uri = weights if weights and "://" in weights else None
        if weights and weights_uri is None:
            weights_dir = Path(weights).expanduser()
        elif "TOTALSEG_WEIGHTS_PATH" in env:
            weights_dir = Path(env["TOTALSEG_WEIGHTS_PATH"]).expanduser()
        else:
            weights_dir = home / "nnunet" / "results"
        cache = Path(env.get("RAYTSEG_CACHE_DIR", str(_user_home(env) / ".cache" / "raytseg")))
        extra: dict[str, object] = {}
        if "RAYTSEG_WEIGHTS_URL" in env:
            extra["weights_base_url"] = env["RAYTSEG_WEIGHTS_URL"]
        if "RAYTSEG_LICENSE_SERVER" in env:
            extra["license_server"] = env["RAYTSEG_LICENSE_SERVER"]
        if "RAYTSEG_MAX_VOXELS" in env:
            extra["max_voxels"] = int(env["RAYTSEG_MAX_VOXELS"])
        if "RAYTSEG_MAX_ARCHIVE_BYTES" in env:
            extra["max_archive_bytes"] = int(env["RAYTSEG_MAX_ARCHIVE_BYTES"])
        if "RAYTSEG_CUDNN_AUTOTUNE" in env:
            extra["cudnn_autotune"] = env["RAYTSEG_CUDNN_AUTOTUNE"]  # pydantic: 1/0, true/false, on/off
        if env.get("RAY_ADDRESS"):
            extra["ray_address"] = env["RAY_ADDRESS"]
        return cls(
            totalseg_home=home,
            weights_dir=weights_dir,
            weights_uri=weights_uri,
            cache_dir=cache.expanduser(),
            **extra,  # type: ignore[arg-type]
        )


def dicomweb_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Authorization header for DICOMweb servers, from the environment or a mounted secret.

    ``RAYTSEG_DICOMWEB_TOKEN`` (a bearer token) or ``RAYTSEG_DICOMWEB_USER`` with
    ``RAYTSEG_DICOMWEB_PASSWORD`` (basic auth); each ``X`` may instead be given as
    ``X_FILE``, the path of a file that holds it (a Kubernetes Secret mounted as a volume).
    Never part of a config, a job record or a log line.
    """
    env = os.environ if environ is None else environ
    token = _secret(env, "RAYTSEG_DICOMWEB_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = _secret(env, "RAYTSEG_DICOMWEB_USER"), _secret(env, "RAYTSEG_DICOMWEB_PASSWORD")
    if user:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _secret(env: Mapping[str, str], name: str) -> str:
    """``$NAME``, or the content of the file ``$NAME_FILE`` names (stripped); empty when neither."""
    if env.get(name):
        return env[name].strip()
    path = env.get(f"{name}_FILE")
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidOptionError(f"Cannot read {name}_FILE ({path}): {exc.strerror}.") from None


def resources_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """``RAYTSEG_TS_RESOURCES``: a folder of TotalSegmentator's resource files (``raytseg.resources``)."""
    env = os.environ if environ is None else environ
    folder = env.get("RAYTSEG_TS_RESOURCES")
    return Path(folder).expanduser() if folder else None


def environment() -> Mapping[str, str]:
    """A snapshot of the process environment, for readers that take an env mapping."""
    return dict(os.environ)


def _user_home(env: Mapping[str, str]) -> Path:
    home = Path(env.get("HOME", str(Path.home())))
    # TotalSegmentator's rule for containers whose HOME is "/".
    return Path("/tmp") if str(home) == "/" else home


def _totalseg_home(env: Mapping[str, str]) -> Path:
    if "TOTALSEG_HOME_DIR" in env:
        return Path(env["TOTALSEG_HOME_DIR"]).expanduser()
    return _user_home(env) / ".totalsegmentator"
