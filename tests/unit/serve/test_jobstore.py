"""The job store on a local folder: claims, records, retention, and a store that fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytseg.errors import StorageError
from raytseg.retry import RetryPolicy
from raytseg.serve.jobstore import JobStore

JOB_A, JOB_B = "a" * 32, "b" * 32


def test_each_claim_outnumbers_the_earlier_ones(tmp_path: Path) -> None:
    first, second = JobStore(str(tmp_path), "app"), JobStore(str(tmp_path), "app")
    one = first.claim()
    two = second.claim()
    assert two > one
    assert second.is_owner(two)
    assert not first.is_owner(one)
    assert JobStore(str(tmp_path), "other-app").claim() == 1  # each app has its own records


def test_a_claim_lost_to_a_concurrent_actor_takes_the_next_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, rival = JobStore(str(tmp_path), "app"), JobStore(str(tmp_path), "app")
    store.claim()
    stale = store._owners()
    rival_number = rival.claim()  # happens between the listing and the create below
    listings = iter([stale])
    monkeypatch.setattr(store, "_owners", lambda: next(listings, None) or JobStore._owners(store))
    assert store.claim() == rival_number + 1
    assert not rival.is_owner(rival_number)


def test_old_claims_are_pruned(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path), "app")
    for _ in range(6):
        number = store.claim()
    assert sorted(store._owners()) == [number - 2, number - 1, number]


def test_records_are_saved_read_and_forgotten(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path), "app")
    store.save(JOB_A, b'{"id": "a"}')
    store.save(JOB_B, b'{"id": "b"}')
    store.save(JOB_A, b'{"id": "a", "state": "running"}')  # replaced whole
    (tmp_path / "app" / "jobs" / ".xx.json.part").write_bytes(b"{")  # a write cut short
    (tmp_path / "app" / "jobs" / "notes.txt").write_bytes(b"not a record")
    assert sorted(store.records()) == [b'{"id": "a", "state": "running"}', b'{"id": "b"}']
    assert store.record(JOB_B) == b'{"id": "b"}'
    assert store.record("c" * 32) is None
    assert store.record("../../etc/passwd") is None  # only job ids name records
    store.forget([JOB_A])
    assert store.records() == [b'{"id": "b"}']


def test_an_unusable_store_says_which_setting_to_check(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    store = JobStore(str(blocker / "jobs"), "app", RetryPolicy(retries=0))
    with pytest.raises(StorageError, match=r"jobs\.store"):
        store.save(JOB_A, b"{}")
    with pytest.raises(StorageError, match=r"jobs\.store"):
        store.claim()
