"""``POST /v1/modality``, ``POST /v1/phase`` and tool jobs: the classifier tools through the
deployments.

Each answer must be the JSON ``raytseg get-modality`` / ``get-phase`` write for the same
image and weights (the in-process pipeline, itself byte-identical to TotalSegmentator's
tools: tests/reference), byte for byte. The classifiers are TotalSegmentator's files from
its installed package.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from raytseg.client import Client
from raytseg.config import Settings
from raytseg.pipeline.export import multilabel_nifti_bytes
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.modality import ROI_SEGMENTATION, modality_of
from raytseg.pipeline.phase import BODY_SEGMENTATION, neck_needed, phase_of
from raytseg.pipeline.records import Segmentation, SegmentOptions, Volume
from raytseg.pipeline.tools import ToolName, ToolRequest, answer_of
from tests.integration.serve.conftest import TOKEN, Service, wait_for_job

Segment = Callable[[Volume, SegmentOptions], Segmentation]


@pytest.fixture(scope="module")
def segment(weights: Path) -> Segment:
    """The in-process segmenter on the service's weights."""
    import torch

    from raytseg.pipeline.run import Segmenter
    from raytseg.weights.store import WeightsStore

    settings = Settings.from_env().model_copy(update={"weights_dir": weights, "weights_uri": None})
    return Segmenter(WeightsStore(settings), torch.device("cpu")).segment


def _volume(data: bytes) -> Volume:
    return load_volume(data, LoadLimits.from_settings(Settings.from_env()))


def test_modality_answers_as_get_modality(api: httpx.Client, ct: bytes) -> None:
    answer = api.post("/v1/modality", content=ct)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.content == modality_of(_volume(ct), None).to_json()
    assert json.loads(answer.content) == {"modality": "ct", "probability": 1.0}


def test_roi_modality_segments_with_total_mr(api: httpx.Client, ct: bytes, segment: Segment) -> None:
    answer = api.post("/v1/modality", params={"normalized_intensities": "true"}, content=ct)
    assert answer.status_code == 200, answer.text
    assert answer.content == modality_of(_volume(ct), segment).to_json()
    assert ROI_SEGMENTATION.task == "total_mr"


def test_the_python_client_asks_for_both(service: Service, ct: bytes, segment: Segment) -> None:
    volume = _volume(ct)
    with Client(service.url, token=TOKEN) as client:
        assert client.modality(ct) == json.loads(modality_of(volume, None).to_json())
        assert client.modality(ct, normalized_intensities=True) == json.loads(
            modality_of(volume, segment).to_json()
        )
        assert client.phase(ct) == json.loads(phase_of(volume, segment).to_json())


def test_phase_answers_as_get_phase(api: httpx.Client, ct: bytes, segment: Segment) -> None:
    volume = _volume(ct)
    # The tiny weights find no brain here, so the neck model is not asked for (that path:
    # tests/unit/serve/test_flow_tools.py; with TotalSegmentator: tests/reference).
    assert not neck_needed(segment(volume, BODY_SEGMENTATION).statistics or {})
    answer = api.post("/v1/phase", content=ct)
    assert answer.status_code == 200, answer.text
    assert answer.content == phase_of(volume, segment).to_json()
    assert set(json.loads(answer.content)) == {
        "pi_time", "phase", "probability", "pi_time_min", "pi_time_max", "stddev"
    }  # fmt: skip


@pytest.mark.parametrize("route", ["/v1/modality", "/v1/phase"])
def test_the_tools_refuse_like_segment(route: str, service: Service, ct: bytes) -> None:
    with service.client(token=None) as anonymous:
        assert anonymous.post(route, content=ct).status_code == 401
    with service.client() as api:
        empty = api.post(route, content=b"")
        assert empty.status_code == 400, empty.text
        assert "empty" in empty.json()["error"]["message"]
        garbage = api.post(route, content=b"not an image" * 100)
        assert garbage.status_code in (400, 422), garbage.text


@pytest.mark.parametrize("name", ["example_ct_sm", "example_mr_sm"])
def test_task_auto_runs_and_reports_what_the_pipeline_chooses(
    name: str, api: httpx.Client, service: Service, segment: Segment, reference_data: Path
) -> None:
    # The MR fools the intensity classifier (minimum -47): the service then segments it with
    # total_mr --fast for the ROI classifier, as the in-process pipeline does.
    data = (reference_data / f"{name}.nii.gz").read_bytes()
    expected = segment(_volume(data), SegmentOptions(task="auto", fast=True))
    choice = expected.task_choice
    assert choice is not None
    assert ("ROI classifier" in choice.reason) == (name == "example_mr_sm")
    answer = api.post("/v1/segment", params={"task": "auto", "fast": "true", "ml": "true"}, content=data)
    assert answer.status_code == 200, answer.text
    assert answer.content == multilabel_nifti_bytes(expected)
    assert (answer.headers["x-raytseg-task"], answer.headers["x-raytseg-task-reason"]) == (
        choice.task,
        choice.reason,
    )
    source = service.jobs_dir / "in" / f"auto-{name}.nii.gz"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    body = {
        "input_uri": str(source),
        "output_uri": str(service.jobs_dir / "out" / f"auto-{name}"),
        "task": "auto",
    }
    job = api.post("/v1/jobs", json=body | {"options": {"fast": True}})
    assert job.status_code == 202, job.text
    record = wait_for_job(api, job.json()["id"])
    assert record["state"] == "succeeded", record
    assert record["task"] == "auto"
    assert (record["report"]["task"], record["report"]["task_choice"]) == (choice.task, choice.to_dict())


@pytest.mark.parametrize(("tool", "normalized"), [("get-phase", False), ("get-modality", True)])
def test_a_tool_job_writes_and_records_the_tools_answer(
    tool: ToolName, normalized: bool, service: Service, ct: bytes, segment: Segment
) -> None:
    source, target = service.jobs_dir / "in" / "tool-ct.nii.gz", service.jobs_dir / "out" / f"{tool}.json"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(ct)
    with Client(service.url, token=TOKEN) as client:
        job_id = client.submit_tool_job(str(source), str(target), tool, normalized_intensities=normalized)
        record = client.wait(job_id, poll_s=0.5, timeout_s=300)
    expected = answer_of(ToolRequest(name=tool, normalized_intensities=normalized), _volume(ct), segment)
    assert target.read_bytes() == expected
    assert record["answer"] == json.loads(expected)
    assert (record["task"], record["tool"], record["report"]) == (tool, tool, None)
    assert record["outputs"] == [record["output_uri"]]


def test_a_tool_job_is_refused_before_it_is_queued(api: httpx.Client, service: Service) -> None:
    folder = service.jobs_dir / "out"
    job = {"input_uri": str(service.jobs_dir / "in" / "x.nii.gz"), "output_uri": str(folder / "phase.json")}
    phase = {"name": "get-phase"}
    refused = [
        (job | {"tool": phase, "task": "total"}, "leave out task and options"),
        (job | {"tool": phase, "options": {"fast": True}}, "leave out task and options"),
        (job | {"tool": phase, "output_uri": str(folder / "phase")}, "ending in .json"),
        (job | {"tool": phase | {"normalized_intensities": True}}, "of get-modality only"),
        (job | {"tool": {"name": "get-age"}}, "tool.name"),
        (job | {"tool": phase, "output_uri": "/elsewhere/phase.json"}, "output_uri"),
    ]
    for body, words in refused:
        answer = api.post("/v1/jobs", json=body)
        assert answer.status_code in (403, 422), (body, answer.text)
        assert words in answer.json()["error"]["message"], (body, answer.text)
