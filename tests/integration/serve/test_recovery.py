"""A model replica that dies, even while loading, is replaced and the service recovers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import ray

FAST_MODEL = "Model297"  # the 3 mm total model's deployment


def _replicas(deployment: str) -> set[str]:
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in actors if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]}


def _kill(name: str) -> None:
    with contextlib.suppress(ValueError):  # already gone
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _ready(api: httpx.Client) -> bool:
    try:
        return api.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def test_killed_model_replica_is_replaced(
    api: httpx.Client, tiny_ct: bytes, waiter: Callable[..., None], service: Any
) -> None:
    # After a load: kill the running replica.
    (first,) = _replicas(FAST_MODEL)
    _kill(first)
    # During a load: kill its replacement as soon as it exists (its constructor is loading).
    waiter(lambda: bool(_replicas(FAST_MODEL) - {first}), 60, "a replacement replica", 0.05)
    (second,) = _replicas(FAST_MODEL) - {first}
    _kill(second)
    waiter(lambda: bool(_replicas(FAST_MODEL) - {first, second}) and _ready(api), 120, "recovery")
    deadline = time.monotonic() + 60
    while True:  # a request routed before the controller noticed may still meet the dead one
        answer = api.post("/v1/segment", params={"fast": "true"}, content=tiny_ct)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        assert answer.status_code == 503, answer.text
        assert "Retry-After" in answer.headers
        time.sleep(1)
    assert answer.status_code == 200, answer.text


def test_request_in_flight_when_its_replica_dies_gets_503(
    service: Any, ct: bytes, tiny_ct: bytes, waiter: Callable[..., None]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with service.client() as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/segment", params={"fast": "true"}, content=ct)
        time.sleep(1.0)  # let it reach the model
        for name in _replicas(FAST_MODEL):
            _kill(name)
        answer = pending.result()
        assert answer.status_code in (200, 503), answer.text  # 200 when it had finished already
        if answer.status_code == 503:
            assert answer.json()["error"]["type"] == "ReplicaUnavailableError"
        waiter(lambda: _ready(client), 120, "recovery")
        assert client.post("/v1/segment", params={"fast": "true"}, content=tiny_ct).status_code == 200
