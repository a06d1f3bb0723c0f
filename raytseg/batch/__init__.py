"""Batch segmentation of datasets in object storage, on Ray Data.

    from raytseg.batch import BatchConfig, run_batch
    report = run_batch(BatchConfig(input="s3://bucket/cts/", output="s3://bucket/seg/", fast=True))

Modules, in the order a job uses them: ``config`` (the job), ``inputs`` (items from a
prefix or manifest), ``triage`` (what is done already), ``item`` (the steps each item goes
through, Ray-free), ``commit`` (atomic outputs and completion markers), ``stages`` and
``job`` (the Ray Data wiring), ``results`` (rows, the table, progress counts), ``progress``
and ``cli`` (the command line). Retries of transient storage errors: ``raytseg.retry``.
Importing this package imports neither Ray nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytseg.batch.config import BatchConfig

if TYPE_CHECKING:
    from raytseg.batch.job import run_batch
    from raytseg.batch.results import BatchReport

__all__ = ["BatchConfig", "BatchReport", "run_batch"]


def __getattr__(name: str) -> Any:
    if name == "run_batch":
        from raytseg.batch.job import run_batch

        return run_batch
    if name == "BatchReport":
        from raytseg.batch.results import BatchReport

        return BatchReport
    raise AttributeError(f"module 'raytseg.batch' has no attribute {name!r}")
