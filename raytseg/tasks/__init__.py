"""The task catalogue: which models, spacings and classes each TotalSegmentator task uses."""

from raytseg.tasks.registry import (
    Catalog,
    CropSpec,
    DatasetSpec,
    ModelSpec,
    ModeSpec,
    TaskSpec,
    get_task,
    load_catalog,
)

__all__ = [
    "Catalog",
    "CropSpec",
    "DatasetSpec",
    "ModeSpec",
    "ModelSpec",
    "TaskSpec",
    "get_task",
    "load_catalog",
]
