"""The flow's watch for lost nodes, without Ray: the node list and the calls are stand-ins."""

from __future__ import annotations

import asyncio

import pytest

from raytseg.errors import ReplicaUnavailableError
from raytseg.serve import flow

BOTH = frozenset({"node-a", "node-b"})
ONE_LEFT = frozenset({"node-a"})


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> list[frozenset[str]]:
    """The live nodes each check sees (the last one repeats); fast checks and grace."""
    answers = [BOTH]

    def alive() -> frozenset[str]:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    monkeypatch.setattr(flow, "_alive_nodes", alive)
    monkeypatch.setattr(flow, "_NODE_CHECK_S", 0.01)
    monkeypatch.setattr(flow, "_NODE_LOSS_GRACE_S", 0.1)
    return answers


async def _after(seconds: float, value: str) -> str:
    await asyncio.sleep(seconds)
    return value


def test_a_call_outliving_a_lost_node_fails_and_is_cancelled(cluster: list[frozenset[str]]) -> None:
    cluster[:] = [BOTH, ONE_LEFT]

    async def run() -> asyncio.Future[str]:
        stuck: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        with pytest.raises(ReplicaUnavailableError, match="node of the cluster was lost"):
            await asyncio.wait_for(flow._Calls().watched(stuck), 5)  # not forever if unwatched
        return stuck

    assert asyncio.run(run()).cancelled()


def test_a_call_finishing_within_the_grace_period_succeeds(cluster: list[frozenset[str]]) -> None:
    cluster[:] = [BOTH, ONE_LEFT]
    assert asyncio.run(flow._Calls().watched(_after(0.05, "done"))) == "done"


def test_long_calls_are_left_alone_while_every_node_lives(cluster: list[frozenset[str]]) -> None:
    cluster[:] = [BOTH]
    assert asyncio.run(flow._Calls().watched(_after(0.3, "done"))) == "done"  # 3x the grace


def test_a_node_joining_is_no_loss(cluster: list[frozenset[str]]) -> None:
    cluster[:] = [ONE_LEFT, BOTH]
    assert asyncio.run(flow._Calls().watched(_after(0.3, "done"))) == "done"
