"""Before Ray: complete items are skipped, stale ones and bad per-row tasks fail, levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytseg.batch import job as job_module
from raytseg.batch.commit import MARKER_NAME
from raytseg.batch.config import BatchConfig
from raytseg.batch.inputs import WorkItem
from raytseg.batch.item import JobSpec
from raytseg.batch.results import ItemResult
from raytseg.batch.triage import model_levels, triage
from raytseg.config import Settings
from raytseg.pipeline.modality import ROI_SEGMENTATION
from raytseg.pipeline.phase import BODY_SEGMENTATION
from raytseg.pipeline.plan import admit
from raytseg.pipeline.records import SegmentOptions
from raytseg.tasks import ModelSpec


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"HOME": str(tmp_path), "RAYTSEG_WEIGHTS": str(tmp_path / "weights")})


def job_for(tmp_path: Path, settings: Settings, **options: object) -> JobSpec:
    config = BatchConfig.model_validate(
        {"input": "in", "output": str(tmp_path / "out"), "fast": True, **options}
    )
    return JobSpec(config, settings, "run2")


def item(tmp_path: Path, item_id: str, task: str | None = None) -> WorkItem:
    return WorkItem(item_id, f"in/{item_id}.nii.gz", str(tmp_path / "out" / item_id), task)


def mark(job: JobSpec, work: WorkItem, **fields: object) -> None:
    done = ItemResult(
        work.id, "old/input", work.output, "total", "ok", outputs=(f"{work.output}/liver.nii.gz",)
    )
    marker = {
        **json.loads(done.to_json()),
        "fingerprint": job.fingerprint(work),
        "attempt": "run1-x",
        **fields,
    }
    Path(work.output).mkdir(parents=True)
    (Path(work.output) / MARKER_NAME).write_text(json.dumps(marker))


def test_complete_items_are_skipped_stale_and_bad_ones_fail(tmp_path: Path, settings: Settings) -> None:
    job = job_for(tmp_path, settings)
    done, stale, fresh, bad = (item(tmp_path, "done"), item(tmp_path, "stale"), item(tmp_path, "fresh"),
                               item(tmp_path, "bad", task="no_such_task"))  # fmt: skip
    mark(job, done)
    mark(job, stale, fingerprint="made-with-other-options")
    todo, finished = triage([done, stale, fresh, bad], job)

    assert todo == [fresh]
    by_id = {r.id: r for r in finished}
    assert (by_id["done"].status, by_id["done"].attempt, by_id["done"].input) == (
        "skipped",
        "run1-x",
        done.input,
    )
    assert by_id["done"].outputs == (f"{done.output}/liver.nii.gz",)
    assert (by_id["stale"].status, by_id["stale"].error_type) == ("failed", "StaleOutputError")
    assert "--overwrite" in (by_id["stale"].error_message or "")
    assert (by_id["bad"].status, by_id["bad"].error_type) == ("failed", "UnknownTaskError")


def test_overwrite_runs_everything(tmp_path: Path, settings: Settings) -> None:
    job = job_for(tmp_path, settings, overwrite=True)
    done = item(tmp_path, "done")
    mark(job, done)
    assert triage([done], job) == ([done], [])


def test_model_stages_follow_the_passes_of_every_item(tmp_path: Path, settings: Settings) -> None:
    job = job_for(tmp_path, settings, roi_subset=("liver",))
    levels = model_levels([item(tmp_path, "a"), item(tmp_path, "b", task="total_mr")], job)
    ids = [sorted(spec.dataset_id for spec in level) for level in levels]
    # roi_subset: a coarse model finds the region (total: 6 mm, total_mr: 3 mm), then the main pass.
    assert ids == [[298, 852], [297, 852]]
    plain = job_for(tmp_path, settings, fast=False)
    levels = model_levels([item(tmp_path, "a", task="lung_vessels"), item(tmp_path, "b", task="body")], plain)
    # lung_vessels crops to the lungs with the 3 mm total model; body (1.5 mm) has one pass.
    assert [sorted(spec.dataset_id for spec in level) for level in levels] == [[297, 299], [117]]


def test_task_auto_items_are_checked_and_staged_as_either_task(tmp_path: Path, settings: Settings) -> None:
    job = job_for(tmp_path, settings, task="auto")
    levels = model_levels([item(tmp_path, "a")], job)
    assert [sorted(spec.dataset_id for spec in level) for level in levels] == [[297, 852]]  # total, total_mr
    # total_mr has no kidney cysts: a subset naming one fails whatever the image turns out to be
    cysts = job_for(tmp_path, settings, task="auto", roi_subset=("kidney_cyst_left",))
    todo, done = triage([item(tmp_path, "a")], cysts)
    assert todo == []
    assert (done[0].status, done[0].error_type) == ("failed", "UnknownClassError")
    assert "total_mr" in (done[0].error_message or "")


def test_metrics_per_item(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, tuple[object, ...]]] = []

    class Recorder:
        def __getattr__(self, name: str) -> object:
            return lambda *args: calls.append((name, args))

    import raytseg.metrics

    monkeypatch.setattr(raytseg.metrics, "recorder", Recorder)
    ok = ItemResult(
        "a", "i", "o", "total", "ok", voxels=100, timings={"model": 2.0, "write": 1.0, "total": 4.0}
    )
    failed = ItemResult(
        "b", "i", "o", "total", "failed", "UnreadableImageError", "bad", timings={"load": 0.1}
    )
    job_module._record_metrics(ok, pending=1)
    job_module._record_metrics(failed, pending=0)
    assert calls == [
        ("request", ("total", "ok", "batch")),
        ("queue_depth", (1, "batch")),
        ("stage", ("total", "model", 2.0, "batch")),
        ("stage", ("total", "export", 1.0, "batch")),
        ("stage", ("total", "end_to_end", 4.0, "batch")),
        ("voxels", ("total", 100, "batch")),
        ("request", ("total", "failed", "batch")),
        ("queue_depth", (0, "batch")),
        ("error", ("total", "UnreadableImageError", "batch")),
        ("stage", ("total", "load", 0.1, "batch")),
    ]


def test_a_tool_job_runs_its_segmentations_and_refuses_a_row_task(tmp_path: Path, settings: Settings) -> None:
    def tool_job(**tool: object) -> JobSpec:
        config = BatchConfig.model_validate({"input": "in", "output": str(tmp_path / "out"), "tool": tool})
        return JobSpec(config, settings, "run3")

    def models(options: SegmentOptions) -> list[list[ModelSpec]]:
        return [list(admit(options, settings).passes[0].plan.main.models)]

    one = [item(tmp_path, "a")]
    assert model_levels(one, tool_job(name="get-modality")) == []  # answered when read
    # total --fast; the neck's model loads on first use, for an image with a head
    assert model_levels(one, tool_job(name="get-phase")) == models(BODY_SEGMENTATION)
    normalized = tool_job(name="get-modality", normalized_intensities=True)
    assert model_levels(one, normalized) == models(ROI_SEGMENTATION)
    todo, [failed] = triage([*one, item(tmp_path, "b", task="total")], tool_job(name="get-phase"))
    assert [w.id for w in todo] == ["a"]
    assert (failed.id, failed.task, failed.error_type) == ("b", "get-phase", "InvalidOptionError")
    assert "leave the manifest's task out" in (failed.error_message or "")
