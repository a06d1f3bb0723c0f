"""What every replica sets up from the config: settings, weights, models, the plan check.

Replicas build these in their constructors (never at import), from the ``ServeConfig``
they were bound with plus the environment of their own process (weights location,
TotalSegmentator home), which ``raytseg.config`` reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from raytseg.config import Settings
from raytseg.errors import MissingWeightsError, NotDeployedError
from raytseg.metrics import recorder
from raytseg.pipeline.plan import Admitted, admit, plan_run
from raytseg.pipeline.preprocess import model_key
from raytseg.pipeline.records import SegmentOptions
from raytseg.serve.config import ModelDeploymentSpec, ServeConfig
from raytseg.tasks import ModelSpec, get_task, load_catalog

if TYPE_CHECKING:
    import torch

    from raytseg.pipeline.backends import Conversion
    from raytseg.pipeline.model import LoadedModel
    from raytseg.weights.store import WeightsStore

log = logging.getLogger(__name__)


def settings_for(config: ServeConfig) -> Settings:
    """This process's settings, with the weights location and size limits of ``config``."""
    settings = Settings.from_env()
    update: dict[str, object] = {
        "max_voxels": config.limits.max_voxels,
        "max_archive_bytes": config.limits.max_archive_bytes,
    }
    if config.weights is not None:
        remote = "://" in config.weights and not config.weights.startswith("file://")
        update["weights_uri"] = config.weights if remote else None
        if not remote:
            update["weights_dir"] = Path(config.weights.removeprefix("file://")).expanduser()
    return settings.model_copy(update=update)


def weights_store(config: ServeConfig) -> WeightsStore:
    from raytseg.weights.store import WeightsStore

    return WeightsStore(settings_for(config))


@lru_cache(maxsize=1)
def _specs_by_key() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for task in load_catalog().tasks.values():
        for mode in task.modes.values():
            for spec in mode.models:
                specs.setdefault(model_key(spec), spec)
    return specs


def model_spec(key: str) -> ModelSpec:
    """The catalogue's model with this ``model_key``."""
    spec = _specs_by_key().get(key)
    if spec is None:
        raise NotDeployedError(f"No model {key!r} in the task catalogue.")
    return spec


def torch_device(config: ServeConfig) -> torch.device:
    """The replica's device; also sets its torch threads (once, in the constructor)."""
    from raytseg.pipeline.model import configure_torch, select_device

    device = select_device(config.device)
    autotune = settings_for(config).cudnn_autotune
    configure_torch(device, threads=config.torch_threads, cudnn_autotune=autotune)
    return device


def load_model(
    store: WeightsStore, key: str, device: torch.device, conversion: Conversion | None = None
) -> LoadedModel:
    """Build one network from the weights store (converted for its backend with a
    ``conversion``), recording the load time."""
    from raytseg.pipeline.model import LoadedModel, ModelFiles
    from raytseg.pipeline.preprocess import read_model_plans
    from raytseg.weights.synth import warn_if_synthetic

    spec = model_spec(key)
    warn_if_synthetic([spec], store)  # in the replica's log, as the CLI and batch say it
    started = time.perf_counter()
    files = ModelFiles(read_model_plans(store, spec), tuple(store.checkpoint_paths(spec)))
    model = LoadedModel.load(files, device, conversion)
    seconds = time.perf_counter() - started
    recorder().model_load(key, seconds)
    log.info("Loaded model %s on %s (%s) in %.1f s", key, device, model.backend, seconds)
    return model


@dataclass(frozen=True)
class Catalogue:
    """Which tasks, modes and models this deployment serves."""

    config: ServeConfig

    def admit(self, options: SegmentOptions, modality: str | None = None) -> Admitted:
        """``admit(options)`` (the checks of every entry point), refused unless the task and
        mode it runs are served here.

        Raises:
            UnknownTaskError, InvalidOptionError, UnknownClassError: from planning.
            LicenseError: the task needs a license key and none is set.
            NotDeployedError: the task or mode exists but is not served here.
        """
        admitted = admit(options, settings_for(self.config), modality=modality)
        self._check_served(admitted.options)
        return admitted

    def _check_served(self, options: SegmentOptions) -> None:
        task = get_task(options.task)
        entry = self.config.tasks.get(task.name)
        if entry is None:
            served = ", ".join(self.config.tasks)
            raise NotDeployedError(f"Task {task.name!r} is not served here; served tasks: {served}.")
        mode, _ = task.select_mode(fast=options.fast, fastest=options.fastest)
        if mode not in entry.modes:
            raise NotDeployedError(
                f"Task {task.name!r} is served in mode(s) {', '.join(entry.modes)}, not {mode!r}."
            )

    def dedicated_models(self) -> dict[str, ModelSpec]:
        """Models with deployments of their own: every model a dedicated task's modes run
        (its default crop pass included), in catalogue order."""
        return {model_key(spec): spec for _, spec in self._models(dedicated_only=True)}

    def served_models(self) -> dict[str, ModelSpec]:
        """Every model a served task and mode runs, its own crop pass included. The crop
        models that ``roi_subset`` or ``body_seg`` add load when a request needs them
        (a 503 names them if their weights are missing)."""
        return {model_key(spec): spec for _, spec in self._models(dedicated_only=False)}

    def owner(self, key: str) -> str | None:
        """The configured task whose deployment settings apply to model ``key``."""
        return next(
            (name for name, spec in self._models(dedicated_only=True) if model_key(spec) == key), None
        )

    def deployment(self, key: str) -> ModelDeploymentSpec:
        """The settings of model ``key``'s own deployment: its task's override, else ``models``."""
        owner = self.owner(key)
        override = self.config.tasks[owner].model if owner is not None else None
        return override or self.config.models

    def _models(self, *, dedicated_only: bool) -> Iterator[tuple[str, ModelSpec]]:
        for name, entry in self.config.tasks.items():
            if dedicated_only and not entry.dedicated:
                continue
            for mode in entry.modes:
                options = SegmentOptions(task=name, fast=mode == "fast", fastest=mode == "fastest")
                for spec in plan_run(options).all_models:
                    yield name, spec


def check_weights(config: ServeConfig) -> None:
    """Every model the service may run is in its local weights folder, or one
    ``MissingWeightsError`` names each missing model and the command that fetches it.

    Remote weights (a URI) are not checked here: that would download them.
    """
    from raytseg.weights.store import WeightsStore

    settings = settings_for(config)
    if settings.weights_uri is not None:
        return
    store = WeightsStore(settings)
    problems = []
    for spec in Catalogue(config).served_models().values():
        try:
            store.checkpoint_paths(spec)
        except MissingWeightsError as exc:
            problems.append(str(exc))
    if problems:
        raise MissingWeightsError("\n".join(problems))


# Ray's resource of the head node; Serve pins its controller with the same request.
HEAD_NODE_RESOURCE = "node:__internal_head__"
INGRESS = "Ingress"
PREPROCESS = "Preprocess"
POSTPROCESS = "Postprocess"
POOL = "ModelPool"


def deployment_name(key: str) -> str:
    """Deployment of a dedicated model: ``Model<dataset id>`` (ids are unique per model_key)."""
    return f"Model{model_spec(key).dataset_id}"
