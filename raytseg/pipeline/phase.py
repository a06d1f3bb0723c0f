"""The contrast phase of a CT: TotalSegmentator's ``totalseg_get_phase`` on raytseg's pipeline.

Median intensities of 16 structures (``total --fast``) and, when the brain is in the image
(more than 100 mm³), of 4 neck vessels (``headneck_bones_vessels``) go into
TotalSegmentator's five XGBoost regressors, which predict the time since injection
(``pi_time``, seconds); the mean maps to a phase. The regressors are a pickle in
TotalSegmentator's package (``raytseg.resources`` finds it, never copied); a pickle can
run code when loaded, so it is read only from that trusted location and by an unpickler
that admits nothing but the three XGBoost/builtin types the file holds.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from raytseg.errors import MissingResourceError
from raytseg.pipeline.records import SegmentOptions
from raytseg.resources import resource_path

if TYPE_CHECKING:
    from raytseg.pipeline.records import Segmentation, Volume

CLASSIFIERS = "contrast_phase_classifiers_2024_07_19.pkl"
ORGANS = (
    "liver", "pancreas", "urinary_bladder", "gallbladder", "heart", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_vena_left", "iliac_vena_right",
    "iliac_artery_left", "iliac_artery_right", "pulmonary_vein", "brain", "colon", "small_bowel",
)  # fmt: skip
NECK_VESSELS = (
    "internal_carotid_artery_right", "internal_carotid_artery_left",
    "internal_jugular_vein_right", "internal_jugular_vein_left",
)  # fmt: skip
# What TotalSegmentator runs for the features: median statistics, border structures included.
BODY_SEGMENTATION = SegmentOptions(
    task="total", fast=True, statistics=True, stats_include_incomplete=True, stats_aggregation="median"
)
NECK_SEGMENTATION = SegmentOptions(
    task="headneck_bones_vessels", statistics=True, stats_include_incomplete=True, stats_aggregation="median"
)
_BRAIN_MM3 = 100  # below it the image holds no head: neck features are zeros
# (upper bound of pi_time in s, phase, probability), in TotalSegmentator's order.
_PHASES = (
    (5, "native", 1.0), (10, "native", 0.7), (20, "arterial_early", 0.7), (30, "arterial_early", 1.0),
    (50, "arterial_late", 1.0), (60, "arterial_late", 0.7), (90, "portal_venous", 1.0),
    (100, "portal_venous", 0.7),
)  # fmt: skip
# The only types the classifier file may instantiate (module, name).
_ALLOWED_TYPES = {("xgboost.sklearn", "XGBRegressor"), ("xgboost.core", "Booster"), ("builtins", "bytearray")}

Stats = Mapping[str, Mapping[str, Any]]
Segment = Callable[["Volume", SegmentOptions], "Segmentation"]


@dataclass(frozen=True)
class PhaseGuess:
    """``totalseg_get_phase``'s result, field for field."""

    pi_time: float
    phase: str
    probability: float
    pi_time_min: float
    pi_time_max: float
    stddev: float

    def to_json(self) -> bytes:
        """The file ``totalseg_get_phase -o`` writes, byte for byte."""
        return json.dumps(asdict(self), indent=4).encode()


def phase_of(volume: Volume, segment: Segment, body_stats: Stats | None = None) -> PhaseGuess:
    """Segment what the features need (``body_stats``: an existing ``total --fast -sa median
    -sii`` statistics.json instead of the first model), then predict."""
    body = body_stats if body_stats is not None else _statistics(segment(volume, BODY_SEGMENTATION))
    neck = _statistics(segment(volume, NECK_SEGMENTATION)) if neck_needed(body) else None
    return phase_from(body, neck)


def neck_needed(body: Stats) -> bool:
    """Whether the image holds a head, so the neck vessels' segmentation is needed."""
    return bool(body["brain"]["volume"] > _BRAIN_MM3)


def phase_from(body: Stats, neck: Stats | None) -> PhaseGuess:
    """The phase from the statistics of ``BODY_SEGMENTATION`` and, where ``neck_needed``,
    of ``NECK_SEGMENTATION`` (None: no head, the vessels' features are zeros)."""
    vessels = [0.0] * len(NECK_VESSELS) if neck is None else [neck[v]["intensity"] for v in NECK_VESSELS]
    return predict([body[organ]["intensity"] for organ in ORGANS] + vessels)


def predict(features: list[float]) -> PhaseGuess:
    """The regressors' pi times, summarised as TotalSegmentator does."""
    preds = np.array([fold.predict(np.asarray([features]))[0] for fold in _regressors()])
    pi_time = round(float(np.mean(preds)), 2)
    phase, probability = pi_time_to_phase(pi_time)
    return PhaseGuess(
        pi_time=pi_time,
        phase=phase,
        probability=probability,
        pi_time_min=round(float(preds.min()), 2),
        pi_time_max=round(float(preds.max()), 2),
        stddev=round(float(np.std(preds)), 4),
    )


def pi_time_to_phase(pi_time: float) -> tuple[str, float]:
    """TotalSegmentator's mapping (``delayed`` is never answered: too little training data)."""
    return next(((phase, p) for bound, phase, p in _PHASES if pi_time < bound), ("portal_venous", 0.3))


def _statistics(seg: Segmentation) -> Stats:
    assert seg.statistics is not None, "segmented with statistics=True"
    return seg.statistics


class _XGBoostOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_TYPES:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the phase classifier file")
        return super().find_class(module, name)


@functools.cache
def _regressors() -> tuple[Any, ...]:
    """The five folds, in file order, loaded once per process."""
    try:
        import xgboost  # noqa: F401 - the pickle's classes
    except ImportError as exc:
        raise MissingResourceError("get-phase needs xgboost: pip install 'raytseg[tools]'.") from exc
    data = resource_path(CLASSIFIERS, "get-phase").read_bytes()
    try:
        with warnings.catch_warnings():
            # XGBoost warns that the pickle comes from an older version; it loads it all the same.
            warnings.simplefilter("ignore", UserWarning)
            folds = _XGBoostOnly(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise MissingResourceError(f"{CLASSIFIERS} is not TotalSegmentator's classifier file: {exc}") from exc
    for fold in folds.values():
        # One thread, as for the modality classifiers (raytseg.pipeline.modality._folds);
        # set_params would check parameters these pickles from an older XGBoost lack.
        fold.n_jobs = 1
    return tuple(folds.values())
