"""Load and query the task catalogue (``catalog.json``).

The catalogue is generated from TotalSegmentator's own tables by
``tools/generate_catalog.py``; this module only validates and serves it. It imports
neither torch nor ray, so ``raytseg tasks`` and the HTTP ``/v1/tasks`` answer instantly.
Spacings are in voxel axis order x, y, z (TotalSegmentator's ``resample`` convention).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict

from raytseg.errors import InvalidOptionError, UnknownClassError, UnknownTaskError

Mode = Literal["default", "fast", "fastest"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Frozen):
    """One nnU-Net model: the folder it lives in and the labels it predicts."""

    dataset_id: int
    trainer: str
    plans: str
    configuration: str
    folds: list[int] | None  # None: every fold_* folder found, as nnU-Net does
    labels: dict[int, str]  # model output id -> class name

    @property
    def trainer_folder(self) -> str:
        """``<trainer>__<plans>__<configuration>``, the nnU-Net results sub-folder."""
        return f"{self.trainer}__{self.plans}__{self.configuration}"


class ModeSpec(_Frozen):
    """The models one resolution mode runs, and the spacing the input is resampled to."""

    models: list[ModelSpec]
    resample_mm: tuple[float, float, float] | None  # None: nnU-Net resamples itself


class CropSpec(_Frozen):
    """The task runs only inside the bounding box of these classes."""

    rois: list[str]
    addon_mm: tuple[float, float, float]
    robust: bool  # use the 3 mm model instead of the 6 mm one to find the rois
    crop_task: str | None  # another task finds the rois (only ``teeth``)


class RemoveOutsideSpec(_Frozen):
    """Labels outside these (dilated) classes are removed after prediction."""

    rois: list[str]
    dilation_mm: float


class TaskSpec(_Frozen):
    """Everything raytseg needs to run one TotalSegmentator task."""

    name: str
    modality: Literal["CT", "MR"]
    license_required: bool
    fast_allowed: bool
    step_size: float
    classes: dict[int, str]
    auxiliary: dict[int, str]  # predicted but removed before output
    v1_classes: dict[int, str] | None  # TotalSegmentator 1's numbering (-v1o), where it has one
    preview_groups: tuple[tuple[str, ...], ...] | None  # the 3D preview's columns of classes
    modes: dict[str, ModeSpec]
    crop: CropSpec | None
    body_crop_addon_mm: tuple[float, float, float]
    remove_outside: RemoveOutsideSpec | None
    info: str | None

    @property
    def is_multi_model(self) -> bool:
        return any(len(m.models) > 1 for m in self.modes.values())

    def select_mode(self, *, fast: bool = False, fastest: bool = False) -> tuple[Mode, ModeSpec]:
        """Pick the resolution mode as TotalSegmentator's ``get_task_config`` does."""
        if fast and fastest:
            raise InvalidOptionError("Use either --fast or --fastest, not both.")
        if (fast or fastest) and not self.fast_allowed:
            flag = "--fast" if fast else "--fastest"
            raise InvalidOptionError(f"Task {self.name!r} has only one resolution; run it without {flag}.")
        wanted: Mode = "fast" if fast else ("fastest" if fastest else "default")
        if wanted not in self.modes:
            # TotalSegmentator falls back to "fast" when "fastest" is not defined (body tasks),
            # and single-model tasks run their only model whatever the flag.
            wanted = "fast" if wanted != "default" and "fast" in self.modes else "default"
        return wanted, self.modes[wanted]

    def class_ids(self, names: list[str]) -> list[int]:
        """Label ids of class names; unknown names raise with the valid choices."""
        inverse = {name: idx for idx, name in self.classes.items()}
        unknown = [n for n in names if n not in inverse]
        if unknown:
            raise UnknownClassError(
                f"Task {self.name!r} has no class {', '.join(map(repr, unknown))}. "
                f"List its classes with: raytseg tasks --classes {self.name}"
            )
        return [inverse[n] for n in names]


class DatasetSpec(_Frozen):
    """Where a model's weights are published."""

    folder: str  # DatasetNNN_name, also the zip's top folder
    release: str | None  # GitHub release tag; None: licensed or not published
    license_task: str | None  # task name the license server expects

    @property
    def downloadable(self) -> bool:
        return self.release is not None or self.license_task is not None


class Catalog(_Frozen):
    generated_from: str
    datasets: dict[int, DatasetSpec]
    tasks: dict[str, TaskSpec]


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The catalogue shipped with raytseg (parsed once per process)."""
    raw = json.loads(resources.files("raytseg.tasks").joinpath("catalog.json").read_text())
    for name, task in raw["tasks"].items():
        task["name"] = name
    return Catalog.model_validate(raw)


def get_task(name: str) -> TaskSpec:
    """A task by name; unknown names raise ``UnknownTaskError`` listing what exists."""
    tasks = load_catalog().tasks
    if name not in tasks:
        raise UnknownTaskError(f"Unknown task {name!r}. Valid tasks: {', '.join(tasks)}.")
    return tasks[name]
