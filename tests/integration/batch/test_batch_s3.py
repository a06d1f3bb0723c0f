"""Batch jobs on S3 (moto) and a local Ray: outputs byte-identical to ``raytseg segment``."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raytseg.batch import BatchConfig, run_batch
from raytseg.batch.cli import EXIT_TOO_MANY_FAILURES
from raytseg.cli import main as raytseg_main
from raytseg.pipeline.tools import TOOLS, ToolRequest

pytestmark = pytest.mark.usefixtures("local_ray")

GOOD = {  # item id -> input name
    "ct_small": "ct_small.nii.gz",
    "mr_small": "mr_small.nii.gz",
    "dicom_series": "dicom_series.zip",
    "patient7_series": "patient7/series",
}
BAD = {"corrupt": "corrupt.nii.gz", "truncated": "truncated.nii.gz"}
STAGES = ("load", "preprocess", "model", "postprocess", "write", "total")


def assert_same_files(got: dict[str, bytes], expected: dict[str, bytes], what: str) -> None:
    assert sorted(got) == sorted(expected), what
    different = [name for name in expected if got[name] != expected[name]]
    assert not different, f"{what}: {len(different)} file(s) differ, e.g. {different[:3]}"


def read_table(data: bytes) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(data)).to_pylist()
    return rows


def test_bucket_job_matches_segment_and_reports_every_item(
    upload: Callable[..., str],
    s3_prefix: str,
    s3_files: Callable[[str], dict[str, bytes]],
    reference_outputs: Callable[..., Path],
    local_files: Callable[[Path], dict[str, bytes]],
    item_files: Callable[[dict[str, bytes], str], dict[str, bytes]],
) -> None:
    source = upload(f"{s3_prefix}/in", *GOOD.values(), *BAD.values(), "README.txt")
    output = f"s3://{s3_prefix}/out"
    report = run_batch(BatchConfig(input=source, output=output, fast=True, device="cpu", max_failures=2))

    assert {r.id: r.status for r in report.results} == {
        **dict.fromkeys(GOOD, "ok"),
        **dict.fromkeys(BAD, "failed"),
    }
    assert not report.failures_exceeded
    written = s3_files(output)
    for item, name in GOOD.items():
        expected = local_files(reference_outputs(name, "--fast"))
        assert len(expected) == 117
        assert_same_files(item_files(written, item), expected, item)
    assert not [name for name in written if name.startswith("_staging")]

    rows = {row["id"]: row for row in read_table(written["_results.parquet"])}
    assert sorted(rows) == sorted([*GOOD, *BAD])
    for item, name in GOOD.items():
        row = rows[item]
        assert row["input"] == f"{source}/{name}"
        assert row["output"] == f"{output}/{item}"
        assert (row["status"], row["task"], row["error_type"]) == ("ok", "total", None)
        assert row["error_message"] is None
        assert sorted(row["outputs"]) == sorted(f"{output}/{item}/{f}" for f in item_files(written, item))
        assert all(row[f"{stage}_s"] > 0 for stage in STAGES), row
        assert row["statistics"] is None
        run = json.loads(row["report"])
        assert (run["task"], run["input"], run["output"]) == ("total", row["input"], row["output"])
        assert (run["outputs"], run["num_classes"]) == (row["outputs"], 117)
        assert set(run["timings"]) == {"load", "preprocess", "model", "postprocess", "write"}
    assert rows["ct_small"]["voxels"] == 122 * 101 * 30
    for item in BAD:
        row = rows[item]
        assert (row["status"], row["error_type"], row["outputs"]) == ("failed", "UnreadableImageError", [])
        assert f"{item}.nii.gz" in row["error_message"]
        assert not [name for name in written if name.startswith(f"{item}/")]


def test_csv_manifest_statistics_and_radiomics_with_a_crop_pass(
    s3: Any,
    upload: Callable[..., str],
    s3_prefix: str,
    s3_files: Callable[[str], dict[str, bytes]],
    reference_outputs: Callable[..., Path],
    local_files: Callable[[Path], dict[str, bytes]],
    item_files: Callable[[dict[str, bytes], str], dict[str, bytes]],
) -> None:
    base = upload(s3_prefix, "ct_small.nii.gz", "dicom_series.zip")
    manifest = (
        "id,input_uri,notes\n"
        "case-1,ct_small.nii.gz,relative to the manifest\n"
        f"case-2,{base}/dicom_series.zip,absolute\n"
    )
    s3.pipe_file(f"{s3_prefix}/manifest.csv", manifest.encode())
    output = f"s3://{s3_prefix}/out"
    config = BatchConfig(
        input=f"{base}/manifest.csv",
        output=output,
        fast=True,
        roi_subset=("kidney_left", "trachea"),  # a crop pass with the 6 mm model first
        statistics=True,
        radiomics=True,  # reads the voxels again after the model stage
        device="cpu",
    )
    report = run_batch(config)

    assert [(r.id, r.status) for r in report.results] == [("case-1", "ok"), ("case-2", "ok")]
    written = s3_files(output)
    rows = {row["id"]: row for row in read_table(written["_results.parquet"])}
    flags = ("--fast", "-rs", "kidney_left", "trachea", "-s", "-r")
    for item, name in (("case-1", "ct_small.nii.gz"), ("case-2", "dicom_series.zip")):
        expected = local_files(reference_outputs(name, *flags))
        assert sorted(expected) == [
            "kidney_left.nii.gz",
            "statistics.json",
            "statistics_radiomics.json",
            "trachea.nii.gz",
        ]
        assert_same_files(item_files(written, item), expected, item)
        assert json.loads(rows[item]["statistics"]) == json.loads(expected["statistics.json"])
        assert sorted(json.loads(expected["statistics.json"])) == ["kidney_left", "trachea"]
        assert sorted(json.loads(expected["statistics_radiomics.json"])) == ["kidney_left", "trachea"]


def test_parquet_manifest_with_per_row_task_and_output(
    s3: Any,
    upload: Callable[..., str],
    s3_prefix: str,
    s3_files: Callable[[str], dict[str, bytes]],
    reference_outputs: Callable[..., Path],
    local_files: Callable[[Path], dict[str, bytes]],
    item_files: Callable[[dict[str, bytes], str], dict[str, bytes]],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = upload(s3_prefix, "ct_small.nii.gz", "mr_small.nii.gz")
    table = pa.table(
        {
            "input_uri": [f"{base}/ct_small.nii.gz", f"{base}/mr_small.nii.gz"],
            "task": ["body", None],
            "output": ["bodies/ct", None],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    s3.pipe_file(f"{s3_prefix}/manifest.parquet", sink.getvalue())
    output = f"s3://{s3_prefix}/out"
    config = BatchConfig(input=f"{base}/manifest.parquet", output=output, fast=True, device="cpu")
    report = run_batch(config)

    assert [(r.id, r.task, r.status, r.output) for r in report.results] == [
        ("ct_small", "body", "ok", f"{output}/bodies/ct"),
        ("mr_small", "total", "ok", f"{output}/mr_small"),
    ]
    written = s3_files(output)
    body = local_files(reference_outputs("ct_small.nii.gz", "--fast", "-ta", "body"))
    # The derived masks need the voxels after the model stage.
    assert {"body.nii.gz", "skin.nii.gz"} <= set(body)
    assert_same_files(item_files(written, "bodies/ct"), body, "ct_small (body)")
    total = local_files(reference_outputs("mr_small.nii.gz", "--fast"))
    assert_same_files(item_files(written, "mr_small"), total, "mr_small")


def test_exit_code_says_whether_failures_exceed_the_limit(
    upload: Callable[..., str], s3_prefix: str, s3_files: Callable[[str], dict[str, bytes]]
) -> None:
    source = upload(f"{s3_prefix}/in", "ct_small.nii.gz", "corrupt.nii.gz")
    output = f"s3://{s3_prefix}/out"
    args = ["batch", "--input", source, "--output", output, "--fast", "-d", "cpu", "-q"]

    assert raytseg_main(args) == EXIT_TOO_MANY_FAILURES  # default: no failure tolerated
    statuses = {row["id"]: row["status"] for row in read_table(s3_files(output)["_results.parquet"])}
    assert statuses == {"ct_small": "ok", "corrupt": "failed"}
    # Reruns redo only the failed item; one failure out of two items:
    assert raytseg_main([*args, "--max-failures", "1"]) == 0
    assert raytseg_main([*args, "--max-failures", "40%"]) == EXIT_TOO_MANY_FAILURES
    statuses = {row["id"]: row["status"] for row in read_table(s3_files(output)["_results.parquet"])}
    assert statuses == {"ct_small": "skipped", "corrupt": "failed"}


def test_tool_jobs_write_each_items_answer_as_the_cli(
    upload: Callable[..., str],
    s3_prefix: str,
    s3_files: Callable[[str], dict[str, bytes]],
    inputs: Path,
    tmp_path: Path,
) -> None:
    # get-modality answers in the read stage (no model stage); get-phase segments in the model stage
    source = upload(f"{s3_prefix}/in", "ct_small.nii.gz", "corrupt.nii.gz")
    for tool in TOOLS:
        output, request = f"s3://{s3_prefix}/{tool}", ToolRequest(name=tool)
        report = run_batch(
            BatchConfig(input=source, output=output, device="cpu", tool=request, max_failures=1)
        )
        assert {r.id: r.status for r in report.results} == {"ct_small": "ok", "corrupt": "failed"}
        answer = tmp_path / f"{tool}.json"
        cli = [tool, "-i", str(inputs / "ct_small.nii.gz"), "-o", str(answer), "-d", "cpu", "-q"]
        assert raytseg_main(cli) == 0
        written = s3_files(output)
        assert written[f"ct_small/{request.file_name}"] == answer.read_bytes()
        assert not [name for name in written if name.startswith(("_staging", "corrupt/"))]
        rows = {row["id"]: row for row in read_table(written["_results.parquet"])}
        row = rows["ct_small"]
        assert (row["task"], row["answer"], row["report"]) == (tool, answer.read_text(), None)
        assert row["outputs"] == [f"{output}/ct_small/{request.file_name}"]
        assert (rows["corrupt"]["task"], rows["corrupt"]["error_type"]) == (tool, "UnreadableImageError")
