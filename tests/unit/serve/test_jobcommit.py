"""Where a job's run stages its files, and where each one lands when committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytseg.pipeline.records import OutputOptions
from raytseg.serve.jobcommit import STAGING_NAME, Commit, Staging, finish, moves_of


@pytest.mark.parametrize(
    ("output", "files", "final", "named"),
    [
        ("s3://b/out/case1", OutputOptions(ml=True), "s3://b/out/case1", None),
        ("s3://b/out/seg.nii.gz", OutputOptions(ml=True), "s3://b/out", "seg.nii.gz"),
        ("s3://b/out/seg.nii.gz", OutputOptions(ml=False), "s3://b/out/seg.nii.gz", None),  # a folder then
        ("s3://b/answers/phase.json", None, "s3://b/answers", "phase.json"),  # a tool's file
    ],
)
def test_a_run_stages_beside_its_outputs_and_commits_into_their_folder(
    output: str, files: OutputOptions | None, final: str, named: str | None
) -> None:
    staging = Staging.new("job1", output, files)
    assert staging.final == final
    assert staging.root.startswith(f"{final}/{STAGING_NAME}/job1-")
    assert staging.output == (staging.root if named is None else f"{staging.root}/{named}")
    written = (staging.output if named else f"{staging.root}/liver.nii.gz", f"{staging.root}/statistics.json")
    dicomweb = "dicomweb+https://pacs/dicom-web/studies/1/series/2/instances/3"
    moves = moves_of(staging, (*written, dicomweb))
    expected = output if named else f"{final}/liver.nii.gz"
    assert moves == ((written[0], expected), (written[1], f"{final}/statistics.json"))
    assert Staging.new("job1", output, files).root != staging.root  # each run its own


def test_finishing_a_commit_again_is_harmless(tmp_path: Path) -> None:
    staging = Staging.new("job1", str(tmp_path / "out"), OutputOptions(ml=True))
    Path(staging.output).mkdir(parents=True)
    (Path(staging.output) / "segmentation.nii.gz").write_bytes(b"seg")
    moves = moves_of(staging, (f"{staging.output}/segmentation.nii.gz",))
    commit = Commit(staging=staging, moves=moves, outputs=())
    finish(commit)
    finish(commit)  # a successor completing a commit that went through after all
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["segmentation.nii.gz"]  # no staging left
