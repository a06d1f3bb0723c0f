"""What runs a network's convolutions: the model stage's backends.

``torch`` is nnU-Net's own network: bit-identical to TotalSegmentator, and the only backend
on a GPU. ``openvino`` runs the same network converted by OpenVINO on the CPU. On this
project's 2-core machine it computes a 3 mm tile 2.1x faster than torch, and a whole
sliding window 1.34x faster (BENCHMARKS.md). Its logits differ in the last bits of fp32, so
labels can change where classes are nearly tied. Only the network up to its last decoder stage is converted
(``sliding_window.decoder_features``); the lean CPU window still applies the 1x1x1 output
layer slab by slab into its fp16 accumulator, so memory and accumulation are unchanged.

Converted models are cached under ``<cache_dir>/openvino``, keyed by the checkpoint's
bytes, the patch size and the OpenVINO version, and written atomically (a folder renamed
into place): conversion happens when a model loads (a replica's start), never in a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytseg.config import BACKENDS
from raytseg.errors import InvalidOptionError, MissingResourceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# What ``auto`` picks on a CPU. OpenVINO's fidelity on random weights (per-class Dice
# against TotalSegmentator on every parity case, bench/backend_fidelity.py: at least 0.667)
# is below the 0.999 bound a default must hold, so auto stays on torch; see BENCHMARKS.md.
AUTO_ON_CPU = "torch"
# Bumped when what is converted changes, so that older cached conversions are not reused.
CONVERSION_FORMAT = "decoder-features-1"

Features = Callable[["torch.Tensor"], "torch.Tensor"]


def resolve(name: str, device: torch.device) -> str:
    """The backend that runs for ``name`` (auto, torch, openvino) on ``device``."""
    if name not in BACKENDS:
        raise InvalidOptionError(f"Unknown backend {name!r}: use {', '.join(BACKENDS)}.")
    if name == "auto":
        return AUTO_ON_CPU if device.type == "cpu" else "torch"
    if name == "openvino" and device.type != "cpu":
        raise InvalidOptionError(
            f"backend openvino runs on the CPU, and this model runs on {device}: use device cpu, "
            "or backend torch (or auto) on a GPU."
        )
    return name


def conversion_for(name: str, device: torch.device, cache_dir: Path) -> Conversion | None:
    """What loading a model needs for backend ``name`` on ``device`` (None: torch); refused
    here, before any model loads, when the backend cannot run."""
    if resolve(name, device) == "torch":
        return None
    _openvino()
    return Conversion(cache_dir)


@dataclass(frozen=True)
class Conversion:
    """How a network becomes an OpenVINO model, cached under ``cache_dir``."""

    cache_dir: Path

    def compile(self, network: Any, patch: Sequence[int], checkpoints: Sequence[Path]) -> OpenVinoFeatures:
        """The network's decoder features for the CPU, converted once per checkpoint; compiled
        here once, so that a cached copy that does not load is converted again now, not in a
        request."""
        ov = _openvino()
        started = time.perf_counter()
        path, converted = self._cached(network, patch, checkpoints)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            core.compile_model(model, "CPU", self._cpu_config())
        except RuntimeError as exc:  # a damaged cache entry (written whole, changed since)
            if converted:
                raise
            log.warning("Converting model %s again: its cached copy does not load (%s)", path.parent, exc)
            shutil.rmtree(path.parent)
            return self.compile(network, patch, checkpoints)
        log.info(
            "OpenVINO model %s %s in %.1f s",
            path.parent.name[:12],
            "converted" if converted else "read from the cache",
            time.perf_counter() - started,
        )
        return OpenVinoFeatures(core, model, self._cpu_config())

    def _cached(self, network: Any, patch: Sequence[int], checkpoints: Sequence[Path]) -> tuple[Path, bool]:
        folder = self.cache_dir / "openvino" / _digest(network, patch, checkpoints)
        path = folder / "features.xml"
        if path.is_file():
            return path, False
        _convert_into(folder, network, patch)
        return path, True

    def _cpu_config(self) -> dict[str, Any]:
        import torch

        # f32 inference: on CPUs with bf16 or AMX, OpenVINO would otherwise lower precision.
        # Its threads are the process's torch threads (configure_torch: per replica).
        return {
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }


class OpenVinoFeatures:
    """A converted network; ``session()`` compiles it for one or more predict calls at once.

    Only the converted model stays loaded between sessions (its weights, mapped from the
    cache). The compiled network is dropped when the last open session ends: OpenVINO keeps
    its intermediate buffers between inferences (0.95 GB for the 3 mm model), where torch
    frees its activations, and its repacked weights until the compiled network goes (0.4 GB
    for a 1.5 mm model of ``total``, 1.6 GB for the four ``total`` parts that wait while one
    runs). The price, measured against releasing only the buffers: 1.7 % of a window's
    time (1.1 s of a 1.5 mm model's 66 s; BENCHMARKS.md).
    """

    def __init__(self, core: Any, model: Any, config: dict[str, Any]) -> None:
        self._core, self._model, self._config = core, model, config
        self._lock = threading.Lock()
        self._compiled: Any = None
        self._running = 0  # sessions open now

    @contextlib.contextmanager
    def session(self) -> Iterator[Features]:
        """Features of one tile after another. A returned tensor shares OpenVINO's output
        buffer (no copy of a 200 MB tile): it is valid until the next tile is computed."""
        import torch

        with self._lock:
            if self._compiled is None:
                self._compiled = self._core.compile_model(self._model, "CPU", self._config)
            request = self._compiled.create_infer_request()
            self._running += 1

        def features(tile: torch.Tensor) -> torch.Tensor:
            request.infer([tile.numpy()])
            return torch.from_numpy(request.get_output_tensor(0).data)

        try:
            yield features
        finally:
            with self._lock:  # the network's buffers go with the last request (the caller's)
                self._running -= 1
                if self._running == 0:
                    self._compiled = None


def _digest(network: Any, patch: Sequence[int], checkpoints: Sequence[Path]) -> str:
    """The cache key: checkpoints' bytes, input shape, OpenVINO version, conversion format."""
    digest = hashlib.sha256()
    for path in checkpoints:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
    version = _openvino().__version__
    digest.update(repr((tuple(patch), _input_channels(network), version, CONVERSION_FORMAT)).encode())
    return digest.hexdigest()


def _convert_into(folder: Path, network: Any, patch: Sequence[int]) -> None:
    """Convert into a temporary folder beside ``folder``, then rename it into place: a
    reader sees a whole model or none, and two replicas converting at once both succeed."""
    import torch

    from raytseg.pipeline.sliding_window import decoder_features

    ov = _openvino()

    class DecoderFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, tile: torch.Tensor) -> torch.Tensor:
            return decoder_features(self.network, tile)

    folder.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, _input_channels(network), *patch))
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name[:12]}-", dir=folder.parent))
    try:
        with torch.no_grad():
            model = ov.convert_model(DecoderFeatures().eval(), example_input=example)
        ov.save_model(model, str(partial / "features.xml"), compress_to_fp16=False)
        os.rename(partial, folder)
    except OSError:
        if not (folder / "features.xml").is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _input_channels(network: Any) -> int:
    first = next(module for module in network.modules() if hasattr(module, "in_channels"))
    return int(first.in_channels)


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise MissingResourceError(
            "backend openvino needs the Python package openvino, which is not installed here: "
            "pip install 'raytseg[openvino]' (or use backend torch)."
        ) from None
    return openvino
