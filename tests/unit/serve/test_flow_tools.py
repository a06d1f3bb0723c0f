"""The classifier tools' flow without Ray: which segmentations ``Flow.answer`` asks for
get-phase, and what reaches the stage that predicts (the deployments are stand-ins)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from raytseg.pipeline import phase
from raytseg.pipeline.records import SegmentOptions
from raytseg.pipeline.tools import PHASE_TOOL, ToolRequest
from raytseg.serve.flow import Flow, Stages


class _Method:
    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function

    def remote(self, *args: Any) -> Coroutine[Any, Any, Any]:
        async def call() -> Any:
            return self._function(*args)

        return call()


class _Given:
    """A stand-in answer: its JSON is what the stage was given."""

    def __init__(self, *given: Any) -> None:
        self._given = given

    def to_json(self) -> bytes:
        return json.dumps(self._given).encode()


class _Handle:
    """A deployment handle whose ``phase`` answers what it was given."""

    def __init__(self) -> None:
        self.phase = _Method(_Given)

    def options(self, **_: Any) -> _Handle:
        return self


def _stats(brain_mm3: float) -> dict[str, dict[str, float]]:
    names = (*phase.ORGANS, *phase.NECK_VESSELS)
    return {name: {"volume": brain_mm3 if name == "brain" else 10.0, "intensity": 1.0} for name in names}


@pytest.mark.parametrize(("brain_mm3", "neck_asked"), [(1000.0, True), (100.0, False)])
def test_phase_segments_the_neck_only_for_a_head(
    brain_mm3: float, neck_asked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[SegmentOptions] = []

    async def statistics(self: Flow, source: bytes, options: SegmentOptions, entrypoint: str) -> Any:
        asked.append(options)
        return _stats(brain_mm3)

    monkeypatch.setattr(Flow, "statistics", statistics)
    handle = _Handle()
    flow = Flow(Stages(handle, handle, {}, None), catalogue=None)  # type: ignore[arg-type]
    answer = asyncio.run(flow.answer(b"image", ToolRequest(name=PHASE_TOOL), "http"))
    body, neck = json.loads(answer)
    expected = [phase.BODY_SEGMENTATION, phase.NECK_SEGMENTATION] if neck_asked else [phase.BODY_SEGMENTATION]
    assert asked == expected
    assert body == _stats(brain_mm3)
    assert neck == (_stats(brain_mm3) if neck_asked else None)
