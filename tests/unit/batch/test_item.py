"""An item's steps without Ray: the same files as the in-process Segmenter, failures as rows."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raytseg.batch.commit import MARKER_NAME
from raytseg.batch.config import BatchConfig
from raytseg.batch.inputs import WorkItem
from raytseg.batch.item import ItemState, JobSpec, advance, predict, result_of, start
from raytseg.config import Settings
from raytseg.pipeline.export import write_segmentation
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.run import Segmenter
from raytseg.pipeline.tools import answer_of

REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "totalseg-reference"
CT = REFERENCE / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)
    synthesize_task("headneck_bones_vessels", root, tiny=True)  # get-phase, for an image with a head
    home = tmp_path_factory.mktemp("home")
    return Settings.from_env({"HOME": str(home), "RAYTSEG_WEIGHTS": str(root)})


@pytest.fixture(scope="module")
def segmenter(settings: Settings) -> Segmenter:
    """Fake networks (these tests are about the steps around them): the 6 mm crop model
    never finds liver or spleen, so a request for them meets an empty crop region."""
    import torch

    from raytseg.testing import fake_networks
    from raytseg.weights.store import WeightsStore

    networks = fake_networks(absent={"liver", "spleen"})
    return Segmenter(WeightsStore(settings), torch.device("cpu"), load_network=networks)


def run_item(job: JobSpec, segmenter: Segmenter, item: WorkItem) -> tuple[ItemState, list[bool]]:
    """The steps in the pipeline's order, pickling between them as Ray does.

    Also returns, per pass, whether the image's voxels travelled to the model stage.
    """
    state = start(item, job, segmenter)
    voxels_sent = []
    while state.active:
        voxels_sent.append(state.volume is not None and state.volume.data.size > 0)
        state = pickle.loads(pickle.dumps(state))
        predict(state, job, segmenter)
        advance(state, job, segmenter)
    return state, voxels_sent


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def expected(
    settings: Settings, segmenter: Segmenter, tmp_path: Path
) -> Callable[[BatchConfig], dict[str, bytes]]:
    def segment(config: BatchConfig) -> dict[str, bytes]:
        volume = load_volume(CT, LoadLimits.from_settings(settings))
        seg = segmenter.segment(volume, config.segment_options())
        out = tmp_path / "expected"
        write_segmentation(seg, volume, str(out), config.output_options)
        return files(out)

    return segment


@pytest.mark.parametrize(
    ("options", "passes"),
    [
        ({"statistics": True, "roi_subset": ("kidney_left", "trachea")}, [True, True]),
        ({"roi_subset": ("liver", "spleen")}, [True]),  # the crop pass finds nothing (see segmenter)
        ({"statistics": True, "statistics_extra": True, "skip_saving": True}, [False]),  # model-grid stats
    ],
    ids=["crop-pass-statistics", "empty-crop-region", "statistics-only"],
)
def test_steps_write_what_the_segmenter_writes(
    settings: Settings,
    segmenter: Segmenter,
    expected: Callable[[BatchConfig], dict[str, bytes]],
    tmp_path: Path,
    options: dict[str, object],
    passes: list[bool],
) -> None:
    config = BatchConfig.model_validate(
        {
            "input": "unused",
            "output": str(tmp_path / "out"),
            "device": "cpu",
            "fast": True,
            "ml": True,
            **options,
        }
    )
    job = JobSpec(config, settings, run_id="run1")
    item = WorkItem("ct", str(CT), str(tmp_path / "out" / "ct"))
    state, voxels_sent = run_item(job, segmenter, item)

    result = result_of(state)
    assert (result.status, result.error_type) == ("ok", None)
    written = files(tmp_path / "out" / "ct")
    assert written.pop(MARKER_NAME)
    assert written == expected(config)
    assert sorted(result.outputs) == sorted(f"{item.output}/{name}" for name in written)
    assert set(result.timings) == {"load", "preprocess", "model", "postprocess", "write", "total"}
    assert not (tmp_path / "out" / "_staging").exists() or not files(tmp_path / "out" / "_staging")
    # Which passes ran, and whether the voxels travelled with them: a crop pass needs them
    # again to prepare the main pass; a plain --fast run leaves them behind.
    assert voxels_sent == passes


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ({}, False),
        ({"statistics": True}, False),
        ({"preview": True}, True),
        ({"roi_subset": ("liver",)}, True),
    ],
)
def test_voxels_travel_on_only_when_a_later_step_reads_them(
    settings: Settings, segmenter: Segmenter, tmp_path: Path, options: dict[str, object], kept: bool
) -> None:
    config = BatchConfig.model_validate({"input": "i", "output": str(tmp_path), "fast": True, **options})
    state = start(WorkItem("ct", str(CT), str(tmp_path / "ct")), JobSpec(config, settings, "run1"), segmenter)
    assert state.awaits_models
    assert state.volume is not None
    assert (state.volume.data.size > 0) is kept
    assert state.voxels == 122 * 101 * 30


def test_dicom_outputs_are_written_and_committed_beside_the_nifti(
    settings: Settings, segmenter: Segmenter, tmp_path: Path
) -> None:
    import nibabel as nib

    from raytseg.pipeline.labeltable import read_label_table
    from raytseg.testing import seg_masks

    series = CT.parent / "example_ct_dicom"
    config = BatchConfig.model_validate(
        {
            "input": "i",
            "output": str(tmp_path / "out"),
            "fast": True,
            "output_type": "nifti,dicom_seg",
            # a few segments: a SEG of every class takes ~40 s to encode, for nothing more
            "roi_subset": ("kidney_left", "trachea", "aorta"),
        }
    )
    item = WorkItem("series", str(series), str(tmp_path / "out" / "series"))
    state, _ = run_item(JobSpec(config, settings, "run1"), segmenter, item)
    assert (result_of(state).status, result_of(state).error_type) == ("ok", None)
    folder = tmp_path / "out" / "series"
    assert sorted(files(folder)) == sorted([MARKER_NAME, "segmentation.nii.gz", "segmentation_seg.dcm"])
    multilabel = nib.load(folder / "segmentation.nii.gz")
    labels = np.asarray(multilabel.dataobj)
    masks = seg_masks((folder / "segmentation_seg.dcm").read_bytes(), multilabel.affine, labels.shape)
    table = read_label_table(multilabel)
    assert masks
    for name, mask in masks.items():
        k = next(k for k, n in table.items() if n == name)
        np.testing.assert_array_equal(mask, labels == k, err_msg=name)
    refused, _ = run_item(
        JobSpec(config, settings, "run1"), segmenter, WorkItem("ct", str(CT), str(tmp_path / "ct"))
    )
    assert (result_of(refused).status, result_of(refused).error_type) == ("failed", "DicomOutputError")


def test_a_bad_item_becomes_a_failed_result(settings: Settings, segmenter: Segmenter, tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    config = BatchConfig(input="unused", output=str(tmp_path / "out"), fast=True, device="cpu")
    state, _ = run_item(
        JobSpec(config, settings, "run1"), segmenter, WorkItem("bad", str(bad), str(tmp_path / "out" / "bad"))
    )

    result = result_of(state)
    assert (result.status, result.error_type) == ("failed", "UnreadableImageError")
    assert "bad.nii.gz" in (result.error_message or "")
    assert not (tmp_path / "out" / "bad").exists()


def test_a_missing_model_fails_the_item_with_the_fix(settings: Settings, tmp_path: Path) -> None:
    import torch

    from raytseg.weights.store import WeightsStore

    empty = Settings.from_env({"HOME": str(tmp_path), "RAYTSEG_WEIGHTS": str(tmp_path / "none")})
    segmenter = Segmenter(WeightsStore(empty), torch.device("cpu"))
    config = BatchConfig(input="unused", output=str(tmp_path / "out"), fast=True, device="cpu")
    shutil.copy(CT, tmp_path / "ct.nii.gz")
    state, _ = run_item(
        JobSpec(config, empty, "run1"),
        segmenter,
        WorkItem("ct", str(tmp_path / "ct.nii.gz"), str(tmp_path / "out" / "ct")),
    )
    result = result_of(state)
    assert (result.status, result.error_type) == ("failed", "MissingWeightsError")
    assert "raytseg weights download" in (result.error_message or "")


def test_task_auto_items_run_and_report_the_segmenters_choice(tmp_path: Path) -> None:
    pytest.importorskip("xgboost")
    import torch

    from raytseg.weights.store import WeightsStore
    from raytseg.weights.synth import synthesize_task

    for task in ("total", "total_mr"):
        synthesize_task(task, tmp_path / "weights", fast=True, tiny=True)
    settings = Settings.from_env({"HOME": str(tmp_path), "RAYTSEG_WEIGHTS": str(tmp_path / "weights")})
    segmenter = Segmenter(WeightsStore(settings), torch.device("cpu"))
    config = BatchConfig(input="unused", output=str(tmp_path / "out"), task="auto", fast=True, device="cpu")
    for name in ("example_ct_sm", "example_mr_sm"):
        source = str(REFERENCE / f"{name}.nii.gz")
        volume = load_volume(source, LoadLimits.from_settings(settings))
        choice = segmenter.segment(volume, config.segment_options()).task_choice
        assert choice is not None
        state, _ = run_item(
            JobSpec(config, settings, "run1"), segmenter, WorkItem(name, source, f"{tmp_path}/{name}")
        )
        result = result_of(state)
        assert (result.status, result.task) == ("ok", choice.task), result.error_message
        report = json.loads(result.report or "{}")
        assert (report["task"], report["task_choice"]) == (choice.task, choice.to_dict())
        assert set(report["backends"].values()) == {"torch"}  # the model stage's, by model
    assert "ROI classifier" in choice.reason  # the MR, last: its minimum is -47


@pytest.mark.parametrize("name", ["get-modality", "get-phase"])
def test_a_tool_item_writes_and_reports_the_tools_answer(
    settings: Settings, segmenter: Segmenter, tmp_path: Path, name: str
) -> None:
    config = BatchConfig.load(None, {"input": "i", "output": str(tmp_path / "out"), "tool": {"name": name}})
    assert config.tool is not None
    item = WorkItem("ct", str(CT), str(tmp_path / "out" / "ct"))
    state, _ = run_item(JobSpec(config, settings, run_id="run1"), segmenter, item)
    result = result_of(state)
    volume = load_volume(CT, LoadLimits.from_settings(settings))
    expected = answer_of(config.tool, volume, segmenter.segment)
    assert (result.status, result.error_message) == ("ok", None)
    assert (result.task, result.answer, result.report) == (name, expected.decode(), None)
    written = files(tmp_path / "out" / "ct")
    assert written.pop(MARKER_NAME)
    assert written == {config.tool.file_name: expected}
    assert result.outputs == (f"{item.output}/{config.tool.file_name}",)
