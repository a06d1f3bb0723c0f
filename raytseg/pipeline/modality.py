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

``choose_task`` is task ``auto``'s decision (raytseg's own): the DICOM Modality tag where
present; otherwise the intensity classifier, unless it answers ``ct`` for an image without
air (``CT_AIR_HU``), which no CT in Hounsfield units is: then the ROI classifier decides.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from raytseg.pipeline.plan import AUTO_TASK, TASK_FOR_MODALITY, Admitted, admit
from raytseg.pipeline.records import SegmentOptions, TaskChoice
from raytseg.resources import resource_path

if TYPE_CHECKING:
    from raytseg.config import Settings
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
# Every CT in Hounsfield units holds air (about -1000 HU) around the body or in the lungs; an
# image whose lowest value is above this is not one, whatever the intensity classifier says
# (it answers ct for the reference MR, whose minimum is -47).
CT_AIR_HU = -200.0

Segment = Callable[["Volume", SegmentOptions], "Segmentation"]


@dataclass(frozen=True)
class ModalityGuess:
    """TotalSegmentator's answer: ``{"modality": "ct" | "mr", "probability": p}``."""

    modality: Literal["ct", "mr"]
    probability: float

    def to_json(self) -> bytes:
        """The file ``totalseg_get_modality -o`` writes, byte for byte."""
        return json.dumps({"modality": self.modality, "probability": self.probability}, indent=4).encode()


def modality_of(volume: Volume, segment: Segment | None) -> ModalityGuess:
    """The intensity classifier's answer, or with ``segment`` (a segmenter's) the ROI classifier's."""
    if segment is None:
        return classify(intensity_features(volume), INTENSITY_MODELS)
    return roi_modality(segment(volume, ROI_SEGMENTATION).statistics)


@dataclass(frozen=True)
class ModalityEvidence:
    """What task ``auto`` knows of an image before segmenting it."""

    dicom: str | None  # the DICOM Modality tag, when it is CT or MR
    intensity: ModalityGuess | None = None  # the intensity classifier's answer, without a tag
    minimum: float = 0.0  # the image's lowest value

    @property
    def needs_roi(self) -> bool:
        """The intensity classifier says ``ct`` of an image without air: ask the ROI one."""
        return self.intensity is not None and self.intensity.modality == "ct" and self.minimum > CT_AIR_HU


def modality_evidence(volume: Volume) -> ModalityEvidence:
    """The DICOM tag, or the intensity classifier's answer and the image's minimum."""
    if volume.modality in TASK_FOR_MODALITY:
        return ModalityEvidence(volume.modality)
    features = intensity_features(volume)
    return ModalityEvidence(None, classify(features, INTENSITY_MODELS), features[2])


def choose_task(evidence: ModalityEvidence, roi: ModalityGuess | None = None) -> TaskChoice:
    """Task ``auto``'s choice; ``roi`` is the ROI classifier's answer, needed when
    ``evidence.needs_roi``."""
    if evidence.dicom is not None:
        return _choice(evidence.dicom, f"DICOM Modality tag {evidence.dicom}")
    assert evidence.intensity is not None, "without a tag the intensity classifier answers"
    said = f"intensity classifier: {_said(evidence.intensity)}"
    if not evidence.needs_roi:
        return _choice(evidence.intensity.modality, said)
    if roi is None:
        raise ValueError("the intensity classifier is contradicted: choose with the ROI classifier's answer")
    return _choice(
        roi.modality,
        f"{said}, but no voxel is below {CT_AIR_HU:g} (minimum {evidence.minimum:g}), as in every CT "
        f"in HU; ROI classifier: {_said(roi)}",
    )


def task_choice(volume: Volume, segment: Segment) -> TaskChoice:
    """``choose_task`` for ``volume``, segmenting it for the ROI classifier when needed."""
    evidence = modality_evidence(volume)
    return choose_task(evidence, modality_of(volume, segment) if evidence.needs_roi else None)


def admit_image(
    options: SegmentOptions, settings: Settings, volume: Volume, segment: Segment
) -> tuple[Admitted, TaskChoice | None]:
    """``options`` admitted for the loaded ``volume``: task auto's choice first (``segment``
    runs the ROI classifier's segmentation when the image needs it), else the image's own
    modality (``total`` of an MR runs ``total_mr``). The service runs the same steps through
    its deployments (``serve.flow``)."""
    choice = task_choice(volume, segment) if options.task == AUTO_TASK else None
    modality = volume.modality if choice is None else choice.modality
    return admit(options, settings, modality=modality), choice


def _choice(modality: str, reason: str) -> TaskChoice:
    tag: Literal["CT", "MR"] = "MR" if modality.upper() == "MR" else "CT"
    return TaskChoice(TASK_FOR_MODALITY[tag], tag, reason)


def _said(guess: ModalityGuess) -> str:
    return f"{guess.modality} (probability {guess.probability:g})"


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
