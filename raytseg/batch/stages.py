"""The Ray Data stages: thin wrappers that run ``item``'s steps in Ray workers.

    read_stage       CPU task     start(): load, admit, prepare the first pass
    ModelStage       actor        predict(): networks loaded once in __init__
    advance_stage    CPU task     advance(): finish a pass; prepare the next or write

Rows carry one pickled ``ItemState`` each (column ``state``); the last stage turns it into
the item's result (column ``result``, JSON).
"""

from __future__ import annotations

import logging
import pickle
import time
from typing import TYPE_CHECKING

import numpy as np

from raytseg.batch.config import BatchConfig
from raytseg.batch.inputs import WorkItem
from raytseg.batch.item import ItemState, JobSpec, advance, predict, result_of, start
from raytseg.errors import RaytsegError
from raytseg.pipeline.preprocess import model_key
from raytseg.tasks import ModelSpec

if TYPE_CHECKING:
    from raytseg.pipeline.run import Segmenter

log = logging.getLogger(__name__)


def configure_storage(config: BatchConfig) -> None:
    """Point fsspec's S3 filesystems at ``storage.endpoint_url`` in this process."""
    endpoint = config.storage.endpoint_url
    if endpoint:
        import fsspec.config

        for protocol in ("s3", "s3a"):
            fsspec.config.conf.setdefault(protocol, {})["endpoint_url"] = endpoint


def read_stage(batch: dict[str, np.ndarray], job: JobSpec) -> dict[str, np.ndarray]:
    plans = _cpu_segmenter(job)
    states = [start(WorkItem.from_json(str(text)), job, plans) for text in batch["item"]]
    return {"state": _pack(states)}


def advance_stage(batch: dict[str, np.ndarray], job: JobSpec, final: bool) -> dict[str, np.ndarray]:
    plans = _cpu_segmenter(job)
    states = _unpack(batch["state"])
    for state in states:
        advance(state, job, plans)
    if final:
        return {"result": np.array([result_of(s).to_json() for s in states], dtype=object)}
    return {"state": _pack(states)}


class ModelStage:
    """A model actor: loads its stage's networks once, then predicts item after item."""

    def __init__(self, job: JobSpec, specs: list[ModelSpec], cpus: float) -> None:
        from raytseg.metrics import recorder
        from raytseg.pipeline.model import configure_torch, select_device
        from raytseg.pipeline.run import Segmenter
        from raytseg.weights.store import WeightsStore

        configure_storage(job.config)
        self.job = job
        device = select_device(job.config.device)
        threads = _torch_threads(job, device.type, cpus)
        configure_torch(device, threads=threads, cudnn_autotune=job.settings.cudnn_autotune)
        self.segmenter = Segmenter(WeightsStore(job.settings), device, backend=job.config.backend)
        for spec in specs:  # later (auto-MR) models load on first use
            started = time.perf_counter()
            try:
                self.segmenter.model(spec)
            except RaytsegError as exc:  # e.g. missing weights: the items fail, with the fix
                log.error("Cannot load model %s: %s", model_key(spec), exc)
                continue
            recorder().model_load(model_key(spec), time.perf_counter() - started)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        states = _unpack(batch["state"])
        for state in states:
            predict(state, self.job, self.segmenter)
        return {"state": _pack(states)}


def _torch_threads(job: JobSpec, device_type: str, cpus: float) -> int | None:
    """``model.threads``, else 1 on a GPU, else the node's cores shared by the stage's actors.

    On a CPU the network is the bottleneck: it gets every core (as in TotalSegmentator),
    split between the most actors the stage may run, even though the CPU stages also use
    them; on 2 cores, 2 threads finish items ~25 % sooner than 1.
    """
    import os

    model = job.config.model
    if model.threads or device_type != "cpu":
        return model.threads or None  # None: configure_torch's default (1 with CUDA)
    return max(1, round(cpus), (os.cpu_count() or 1) // model.concurrency[1])


def _cpu_segmenter(job: JobSpec) -> Segmenter:
    """This worker's plans cache (a CPU ``Segmenter`` that never loads a network)."""
    from raytseg.pipeline.run import default_segmenter

    configure_storage(job.config)
    return default_segmenter("cpu", job.settings)


def _pack(states: list[ItemState]) -> np.ndarray:
    return np.array([pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL) for s in states], dtype=object)


def _unpack(column: np.ndarray) -> list[ItemState]:
    return [pickle.loads(blob) for blob in column]
