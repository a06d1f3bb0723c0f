"""A request that runs past ``request_timeout_s`` gets 504, and its pending calls are cancelled.

A second app on the same Serve instance, with a timeout shorter than any segmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

APP = "timeouts"


@pytest.fixture(scope="module")
def impatient(service: Any) -> Iterator[str]:
    from ray import serve

    from raytseg.serve.app import build_app

    config = service.config.model_dump(mode="json")
    config.update(
        app_name=APP,
        request_timeout_s=0.2,
        tasks={"total": {"modes": ["fast"]}},
        pool={**config["pool"], "enabled": False},
        jobs={"enabled": False},
    )
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{service.url}/{APP}"
    finally:
        serve.delete(APP)


def test_request_past_the_deadline_is_504(impatient: str, service: Any, ct: bytes) -> None:
    with service.client() as client:
        answer = client.post(f"{impatient}/v1/segment", params={"fast": "true"}, content=ct)
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["type"] == "RequestTimeoutError"
        assert client.get(f"{impatient}/healthz").status_code == 200


def test_other_app_unaffected(api: httpx.Client, tiny_ct: bytes) -> None:
    assert api.post("/v1/segment", params={"fast": "true"}, content=tiny_ct).status_code == 200
