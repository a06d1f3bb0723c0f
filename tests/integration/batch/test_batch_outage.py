"""A batch on S3 through a 10 s storage outage (its moto server stopped, then started again),
with the default retry settings: every item ends ok with outputs identical to ``raytseg
segment``, nothing is left half-written, and a rerun finds every item done."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from raytseg.batch import BatchConfig, run_batch
from raytseg.batch.commit import MARKER_NAME
from tests.integration.conftest import Outage, StoppableS3

pytestmark = pytest.mark.usefixtures("local_ray")

OUTAGE_S = 10.0
ITEMS = {"ct_small": "ct_small.nii.gz", "mr_small": "mr_small.nii.gz", "dicom_series": "dicom_series.zip"}


@pytest.fixture(scope="module")
def batch_env(batch_env: dict[str, str], stoppable_s3: StoppableS3) -> Iterator[dict[str, str]]:
    """Every S3 client of this module, the Ray workers' included, uses the stoppable server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", stoppable_s3.url)
        yield {**batch_env, "AWS_ENDPOINT_URL": stoppable_s3.url}


def test_a_batch_rides_out_a_storage_outage(
    stoppable_s3: StoppableS3,
    s3: Any,
    upload: Callable[..., str],
    s3_prefix: str,
    s3_files: Callable[[str], dict[str, bytes]],
    reference_outputs: Callable[..., Path],
    local_files: Callable[[Path], dict[str, bytes]],
    item_files: Callable[[dict[str, bytes], str], dict[str, bytes]],
) -> None:
    source = upload(f"{s3_prefix}/in", *ITEMS.values())
    output = f"s3://{s3_prefix}/out"
    config = BatchConfig(input=source, output=output, fast=True, device="cpu")

    def an_item_is_done() -> bool:
        s3.invalidate_cache()
        return any(s3.exists(f"{s3_prefix}/out/{item}/{MARKER_NAME}") for item in ITEMS)

    outage = Outage(stoppable_s3, an_item_is_done, OUTAGE_S)
    report = run_batch(config)
    restarted = outage.join()

    assert {r.id: r.status for r in report.results} == dict.fromkeys(ITEMS, "ok"), [
        r.error_message for r in report.results
    ]
    finished = [datetime.fromisoformat(r.finished_at).timestamp() for r in report.results]
    assert max(finished) >= int(restarted), "no item was in flight during the outage"
    written = s3_files(output)
    for item, name in ITEMS.items():
        assert item_files(written, item) == local_files(reference_outputs(name, "--fast")), item
    assert not [name for name in written if name.startswith("_staging")]
    again = run_batch(config)
    assert [r.status for r in again.results] == ["skipped"] * len(ITEMS)
