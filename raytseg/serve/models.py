"""The model stage: replicas that hold networks and turn network inputs into labels.

- ``ModelServer``: one network per deployment (the hot models: the five ``total`` parts,
  the 3 mm and 6 mm models...), loaded once in the constructor on the replica's share of
  a GPU. ``max_ongoing_requests`` is small (default 1): a volume keeps a GPU busy for
  seconds to minutes, and a second one in flight would only double the memory peak.
- ``ModelPool``: the long tail of tasks shares one multiplexed deployment; each replica
  keeps an LRU of networks keyed by ``model_key``, and Serve routes a request to a replica
  that already holds its model when it can.

A call gets the whole preprocessing result (one object per request, so each node fetches
it once however many of its models read it) and predicts the inputs addressed to its own
network, one per z chunk. Both return ``NetworkOutput``s (uint8 labels; the argmax ran on
the device), never logits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ray import serve

from raytseg.errors import ModelError
from raytseg.metrics import recorder
from raytseg.pipeline.records import NetworkOutput, Prepared
from raytseg.serve.config import ModelDeploymentSpec, ServeConfig
from raytseg.serve.handoff import Tags, own_arrays
from raytseg.serve.runtime import Catalogue, load_model, torch_device, weights_store

if TYPE_CHECKING:
    import torch

    from raytseg.pipeline.backends import Conversion
    from raytseg.pipeline.model import LoadedModel
    from raytseg.weights.store import WeightsStore

log = logging.getLogger(__name__)


class _DeviceGuard:
    """Predicts on one device and remembers when the device itself failed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._fault: str | None = None

    def predict(self, model: LoadedModel, prepared: Prepared | None, tags: Tags) -> tuple[NetworkOutput, ...]:
        """Labels of every input of ``prepared`` addressed to ``model`` (one per z chunk)."""
        if prepared is None:  # the pass's crop region was empty: nothing to predict
            return ()
        started = time.perf_counter()
        try:
            outputs = tuple(model.predict(own_arrays(i)) for i in prepared.inputs if i.model_key == model.key)
        except ModelError as exc:
            # A CUDA error (illegal access, device assert) poisons the process's context:
            # report unhealthy so Serve replaces the replica. Out-of-memory does not.
            if "CUDA error" in str(exc):
                self._fault = str(exc)
            raise
        recorder().stage(tags.task, tags.stage("model"), time.perf_counter() - started, tags.entrypoint)
        return outputs

    def check(self, model: LoadedModel | None = None) -> None:
        """Raise when the device failed before or does not answer now, or ``model`` left it."""
        if model is not None and not model.on_device():
            raise ModelError(f"The weights of {model.key} are no longer on {self.device}.")
        if self._fault is not None:
            raise ModelError(f"Device {self.device} failed earlier: {self._fault}")
        if self.device.type == "cuda":
            import torch

            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError as exc:
                raise ModelError(f"Device {self.device} does not answer: {exc}") from exc


class ModelServer:
    """A deployment holding one network (``model_key``), loaded in the constructor."""

    def __init__(self, config: ServeConfig, key: str) -> None:
        self._guard = _DeviceGuard(torch_device(config))
        store = weights_store(config)
        conversion = _conversion(Catalogue(config).deployment(key), self._guard.device, store)
        self._model = load_model(store, key, self._guard.device, conversion)

    def predict(self, prepared: Prepared | None, tags: Tags) -> tuple[NetworkOutput, ...]:
        """Labels of this model's inputs in ``prepared`` (sliding window on the replica's device)."""
        return self._guard.predict(self._model, prepared, tags)

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising replaces the replica."""
        self._guard.check(self._model)


class ModelPoolBase:
    """The multiplexed deployment's logic; ``pool_class`` adds the LRU of networks."""

    def __init__(self, config: ServeConfig) -> None:
        self._guard = _DeviceGuard(torch_device(config))
        self._store = weights_store(config)
        self._conversion = _conversion(config.pool, self._guard.device, self._store)

    async def get_model(self, key: str) -> LoadedModel:
        # Loading reads checkpoints and builds the network: off the event loop.
        return await asyncio.to_thread(load_model, self._store, key, self._guard.device, self._conversion)

    async def predict(self, prepared: Prepared | None, tags: Tags) -> tuple[NetworkOutput, ...]:
        """Labels of the inputs in ``prepared`` for the model named by the multiplexed model id."""
        key = serve.get_multiplexed_model_id()
        if not key:
            raise ModelError("A request reached the model pool without a multiplexed model id.")
        model = await self.get_model(key)
        return await asyncio.to_thread(self._guard.predict, model, prepared, tags)

    def check_health(self) -> None:
        self._guard.check()


def _conversion(spec: ModelDeploymentSpec, device: torch.device, store: WeightsStore) -> Conversion | None:
    from raytseg.pipeline.backends import conversion_for

    return conversion_for(spec.backend, device, store.settings.cache_dir)


def pool_class(max_models: int) -> type[ModelPoolBase]:
    """``ModelPoolBase`` whose ``get_model`` keeps up to ``max_models`` networks (LRU).

    ``serve.multiplexed`` takes its size when it decorates, and the size comes from the
    config, so the decorated class is made here rather than with a decorator in the body.
    """
    loader: Any = serve.multiplexed(max_num_models_per_replica=max_models)(ModelPoolBase.get_model)
    return type("ModelPool", (ModelPoolBase,), {"get_model": loader, "__module__": __name__})
