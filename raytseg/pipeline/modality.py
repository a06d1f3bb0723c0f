"""Is an image CT or MR? TotalSegmentator's ``totalseg_get_modality``, on raytseg's pipeline.

Two classifiers, each TotalSegmentator's five XGBoost folds (``resources/``, found by
``raytseg.resources``, never copied), averaged over the folds' predicted classes:

- intensity (default): mean, std, min and max of the image's values (float64, as
  ``get_fdata``). Fast; needs original intensities (HU for CT).
- ROI-based (``-n``): the median intensity, scaled to 0..1 by the image's range, of 16
  structures that ``total_mr --fast`` segments. Works on normalised images; needs that
  model's weights.

Measured with TotalSegmentator's own classifiers: the intensity classifier answers ``ct``
with probability 1.0 for the reference CTs and also for the reference MR
(``example_mr_sm``, minimum -47); raytseg gives the same answers (parity mode).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from raytseg.pipeline.records import SegmentOptions
from raytseg.resources import resource_path

if TYPE_CHECKING:
    from raytseg.pipeline.records import Segmentation, Volume

INTENSITY_MODELS = "modality_classifiers_2025_02_24.json"
ROI_MODELS = "modality_classifiers_normalized_2025_02_24.json"
FOLDS = 5
# The structures of the ROI classifier, in its feature order (totalseg_get_modality.py).
ROI_ORGANS = (
    "brain", "esophagus", "colon", "spinal_cord", "scapula_left", "scapula_right",
    "femur_left", "femur_right", "hip_left", "hip_right", "gluteus_maximus_left",
    "gluteus_maximus_right", "autochthon_left", "autochthon_right", "iliopsoas_left",
    "iliopsoas_right",
)  # fmt: skip
# What TotalSegmentator runs for the ROI features: total_mr, fast, median statistics of
# normalised intensities, border structures included.
ROI_SEGMENTATION = SegmentOptions(
    task="total_mr",
    fast=True,
    statistics=True,
    stats_include_incomplete=True,
    stats_aggregation="median",
    statistics_normalized_intensities=True,
)


@dataclass(frozen=True)
class ModalityGuess:
    """TotalSegmentator's answer: ``{"modality": "ct" | "mr", "probability": p}``."""

    modality: Literal["ct", "mr"]
    probability: float

    def to_json(self) -> bytes:
        """The file ``totalseg_get_modality -o`` writes, byte for byte."""
        return json.dumps({"modality": self.modality, "probability": self.probability}, indent=4).encode()


def modality_of(
    volume: Volume, segment: Callable[[Volume, SegmentOptions], Segmentation] | None
) -> ModalityGuess:
    """The intensity classifier's answer, or with ``segment`` (a segmenter's) the ROI classifier's."""
    if segment is None:
        return classify(intensity_features(volume), INTENSITY_MODELS)
    return roi_modality(segment(volume, ROI_SEGMENTATION).statistics)


def intensity_features(volume: Volume) -> list[float]:
    """Mean, std, min and max of the voxels in float64, as ``get_fdata`` gives them."""
    data = np.asarray(volume.data, dtype=np.float64)
    return [float(np.mean(data)), float(np.std(data)), float(np.min(data)), float(np.max(data))]


def roi_modality(statistics: Mapping[str, Mapping[str, Any]] | None) -> ModalityGuess:
    """The ROI classifier's answer from the statistics of a ``ROI_SEGMENTATION`` result."""
    if statistics is None:
        raise ValueError("the segmentation has no statistics: segment with ROI_SEGMENTATION")
    return classify([float(statistics[organ]["intensity"]) for organ in ROI_ORGANS], ROI_MODELS)


def classify(features: list[float], models: str) -> ModalityGuess:
    """The folds' mean predicted class (0 ct, 1 mr): below 0.5 ``ct``, else ``mr``."""
    predictions = [int(fold.predict(np.asarray([features]))[0]) for fold in _folds(models)]
    mean = float(np.mean(predictions))
    return ModalityGuess("ct", 1 - mean) if mean < 0.5 else ModalityGuess("mr", mean)


@functools.cache
def _folds(models: str) -> tuple[Any, ...]:
    """The five XGBoost folds of ``models``, loaded once per process."""
    from raytseg.errors import MissingResourceError

    try:
        import xgboost
    except ImportError as exc:
        raise MissingResourceError(
            "get-modality needs xgboost: pip install 'raytseg[tools]' (or xgboost-cpu)."
        ) from exc
    folds = []
    for fold in range(FOLDS):
        # One thread: a single row of features, and no thread pool of xgboost's own OpenMP
        # runtime (its wheel bundles a second libgomp beside torch's) in a torch process.
        classifier = xgboost.XGBClassifier(n_jobs=1)
        # The files are UBJSON despite their .json names: load the bytes, format detected.
        path = resource_path(f"{models}.{fold}", "get-modality")
        classifier.load_model(bytearray(path.read_bytes()))
        folds.append(classifier)
    return tuple(folds)
