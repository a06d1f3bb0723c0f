"""Stand-ins for tests of what surrounds the network: no nnU-Net, no weights read.

    segmenter = Segmenter(store, torch.device("cpu"), load_network=fake_networks())

``FakeNetwork`` answers a ``NetworkInput`` with labels in exactly the layout the real model
stage returns (the canonical chunk's voxel order and shape), so everything before and after
the network runs for real. The labels are intensity-rank bands, deterministic and cheap;
they mean nothing, like the labels of random weights.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from raytseg.pipeline.axes import from_network
from raytseg.pipeline.preprocess import ModelPlans
from raytseg.pipeline.records import NetworkInput, NetworkOutput
from raytseg.tasks import ModelSpec

__all__ = ["FakeNetwork", "fake_networks"]


@dataclass
class FakeNetwork:
    """Labels voxels by intensity rank: ``len(classes) + 1`` equal bands, the darkest one
    background, band ``b`` class ``classes[b - 1]`` (the model's own label ids).

    Ranks rather than values, so that every class gets its share of voxels even where many
    voxels share one value (air in a CT).
    """

    key: str
    classes: Sequence[int]
    transpose_backward: tuple[int, ...] = (0, 1, 2)

    def predict(self, item: NetworkInput) -> NetworkOutput:
        data = item.data[0]
        order = np.argsort(data, axis=None, kind="stable")
        bands = np.empty(data.size, dtype=np.int64)
        bands[order] = np.arange(data.size) * (len(self.classes) + 1) // max(data.size, 1)
        lookup = np.array([0, *self.classes], dtype=np.uint8)
        geometry = item.geometry
        labels = _nearest(
            lookup[bands].reshape(data.shape), geometry.shape_after_cropping_and_before_resampling
        )
        full = np.zeros(geometry.shape_before_cropping, dtype=np.uint8)
        full[tuple(slice(lo, hi) for lo, hi in geometry.bbox_used_for_cropping)] = labels
        canonical = from_network(full.transpose(self.transpose_backward))
        return NetworkOutput(self.key, item.chunk, np.ascontiguousarray(canonical))


def fake_networks(absent: Collection[str] = ()) -> Callable[[ModelSpec, ModelPlans], FakeNetwork]:
    """A ``Segmenter(load_network=...)`` that builds fakes predicting every label of each
    model's dataset.json except the class names in ``absent``."""

    def load(spec: ModelSpec, plans: ModelPlans) -> FakeNetwork:
        labels: dict[str, int] = plans.dataset_json["labels"]
        predicted = sorted(int(i) for name, i in labels.items() if int(i) != 0 and name not in absent)
        backward = tuple(int(axis) for axis in plans.plans.get("transpose_backward", (0, 1, 2)))
        return FakeNetwork(plans.model_key, predicted, backward)

    return load


def _nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` resized to ``shape`` by nearest neighbour (when nnU-Net would resample)."""
    if labels.shape == tuple(shape):
        return labels
    index = np.ix_(*(np.arange(n) * size // n for n, size in zip(shape, labels.shape, strict=True)))
    return labels[index]
