"""The fake network answers in the real model stage's layout, so the steps around it run for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raytseg.config import Settings
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.passes import prepare
from raytseg.pipeline.plan import Pass, plan_run
from raytseg.pipeline.preprocess import model_key
from raytseg.pipeline.records import NetworkInput, SegmentOptions
from raytseg.pipeline.run import Segmenter
from raytseg.tasks import ModelSpec
from raytseg.testing import fake_networks

CT = Path(__file__).resolve().parents[2] / "examples" / "data" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)
    return Settings.from_env({"HOME": str(tmp_path_factory.mktemp("home")), "RAYTSEG_WEIGHTS": str(root)})


def _segmenters(settings: Settings, absent: frozenset[str] = frozenset()) -> tuple[Segmenter, Segmenter]:
    import torch

    from raytseg.weights.store import WeightsStore

    store = WeightsStore(settings)
    cpu = torch.device("cpu")
    return Segmenter(store, cpu), Segmenter(store, cpu, load_network=fake_networks(absent))


def _input(segmenter: Segmenter, settings: Settings) -> tuple[NetworkInput, ModelSpec]:
    options = SegmentOptions(fast=True)
    plan = plan_run(options)
    (spec,) = plan.main.models
    volume = load_volume(CT, LoadLimits.from_settings(settings))
    (item,) = prepare(volume, Pass(plan, options), {model_key(spec): segmenter.plans(spec)}, None).inputs
    return item, spec


def test_fake_labels_have_the_real_networks_layout(settings: Settings) -> None:
    real, fake = _segmenters(settings)
    item, spec = _input(real, settings)
    expected = real.model(spec).predict(item)
    got = fake.model(spec).predict(item)
    assert (got.model_key, got.chunk) == (expected.model_key, expected.chunk)
    assert got.labels.shape == expected.labels.shape
    assert got.labels.dtype == expected.labels.dtype == np.uint8
    assert got.labels.flags.c_contiguous


def test_fake_predicts_every_class_but_the_absent_ones(settings: Settings) -> None:
    real, fake = _segmenters(settings, frozenset({"liver"}))
    item, spec = _input(real, settings)
    labels = real.plans(spec).dataset_json["labels"]
    found = set(np.unique(fake.model(spec).predict(item).labels).tolist())
    assert found == {int(i) for name, i in labels.items() if name != "liver"}  # background included


def test_segmenting_with_fakes_is_deterministic(settings: Settings) -> None:
    _, fake = _segmenters(settings)
    volume = load_volume(CT, LoadLimits.from_settings(settings))
    first = fake.segment(volume, SegmentOptions(fast=True)).labels
    again = fake.segment(volume, SegmentOptions(fast=True)).labels
    assert np.array_equal(first, again)
    assert len(np.unique(first)) > 50  # bands of many classes, not one blob
