"""Work items: listing a prefix, reading manifests, deriving safe and unique ids."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from raytseg.batch.inputs import WorkItem, item_id_from_path, work_items
from raytseg.errors import BatchInputError


@pytest.mark.parametrize(
    ("relative", "item_id"),
    [
        ("ct.nii.gz", "ct"),
        ("CT.NII.GZ", "CT"),
        ("scan.nii", "scan"),
        ("series.zip", "series"),
        ("s0001/ct.nii.gz", "s0001_ct"),
        ("patient 7/série (2)", "patient_7_s_rie_2_"),
        ("_private.nii.gz", "private"),
        ("v1.2.nii.gz", "v1.2"),
        ("../../etc/passwd", "etc_passwd"),
    ],
)
def test_ids_are_safe_path_components(relative: str, item_id: str) -> None:
    assert item_id_from_path(relative) == item_id


def test_an_id_needs_a_letter_or_digit() -> None:
    with pytest.raises(BatchInputError, match="manifest"):
        item_id_from_path("__.nii.gz")


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def ids(items: list[WorkItem]) -> list[str]:
    return [item.id for item in items]


def test_listing_finds_nifti_zips_and_dicom_folders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    touch(
        data,
        "a.nii.gz",
        "b.nii",
        "c.zip",
        "notes.txt",
        "p1/s1/IM0001",
        "p1/s1/IM0002",
        "p1/report.pdf",
        "p2/series/CT.1.2.840.113619",
        "p3/x.dcm",
        "p3/.DS_Store",
        "out/a/spleen.nii.gz",  # the job's own output, inside the input prefix
    )
    items = work_items(str(data), str(data / "out"))
    assert ids(items) == ["a", "b", "c", "p1_s1", "p2_series", "p3"]
    assert items[0] == WorkItem("a", f"{data}/a.nii.gz", f"{data}/out/a")
    assert items[3].input == f"{data}/p1/s1"


def test_a_prefix_of_dicom_files_is_one_series(tmp_path: Path) -> None:
    touch(tmp_path / "study42", "IM1", "IM2", "IM3")
    items = work_items(str(tmp_path / "study42"), str(tmp_path / "out"))
    assert [(i.id, i.input) for i in items] == [("study42", str(tmp_path / "study42"))]


def test_loose_files_beside_items_are_not_a_series(tmp_path: Path) -> None:
    touch(tmp_path / "in", "LICENSE", "a.nii.gz")
    assert ids(work_items(str(tmp_path / "in"), str(tmp_path / "out"))) == ["a"]


def test_a_single_file_is_one_item(tmp_path: Path) -> None:
    touch(tmp_path, "scan.nii.gz")
    assert ids(work_items(str(tmp_path / "scan.nii.gz"), str(tmp_path / "out"))) == ["scan"]


@pytest.mark.parametrize("names", [("a.nii.gz", "a.zip"), ("A.nii", "a.nii.gz"), ("x y.nii", "x_y.nii")])
def test_colliding_ids_stop_the_job(tmp_path: Path, names: tuple[str, str]) -> None:
    touch(tmp_path / "in", *names)
    with pytest.raises(BatchInputError, match="same item id") as raised:
        work_items(str(tmp_path / "in"), str(tmp_path / "out"))
    assert all(name in str(raised.value) for name in names)


def test_nothing_to_segment(tmp_path: Path) -> None:
    touch(tmp_path / "in", "readme.md")
    with pytest.raises(BatchInputError, match="nothing to segment"):
        work_items(str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(BatchInputError, match="does not exist"):
        work_items(str(tmp_path / "missing"), str(tmp_path / "out"))


@pytest.fixture
def memory_root() -> Iterator[str]:
    import fsspec

    root = f"memory://batch-inputs-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    fs.rm(root.removeprefix("memory://"), recursive=True)


def test_listing_a_uri_prefix(memory_root: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("in/b.nii.gz", "in/a/IM1", "in/a/IM2", "in/x.json"):
        fs.pipe_file(f"{memory_root.removeprefix('memory://')}/{name}", b"x")
    items = work_items(f"{memory_root}/in", f"{memory_root}/out")
    assert [(i.id, i.input, i.output) for i in items] == [
        ("a", f"{memory_root}/in/a", f"{memory_root}/out/a"),
        ("b", f"{memory_root}/in/b.nii.gz", f"{memory_root}/out/b"),
    ]


def write_manifest(root: Path, name: str, rows: list[dict[str, object]]) -> str:
    path = root / name
    if name.endswith(".csv"):
        columns = sorted({key for row in rows for key in row})
        lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        path.write_bytes(sink.getvalue())
    return str(path)


@pytest.mark.parametrize("name", ["list.csv", "list.jsonl", "list.parquet"])
def test_manifests(tmp_path: Path, name: str) -> None:
    rows: list[dict[str, object]] = [
        {"id": "case-1", "input_uri": "scans/one.nii.gz", "task": "body", "output": "bodies/one"},
        {"input_uri": "s3://bucket/two.zip"},
        {"id": "3", "input_uri": "/abs/three.nii", "output": "s3://elsewhere/3"},
    ]
    manifest = write_manifest(tmp_path, name, rows)
    items = work_items(manifest, "s3://out")
    assert items == [
        WorkItem("case-1", f"{tmp_path}/scans/one.nii.gz", "s3://out/bodies/one", "body"),
        WorkItem("two", "s3://bucket/two.zip", "s3://out/two"),
        WorkItem("3", "/abs/three.nii", "s3://elsewhere/3"),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"path": "a.nii.gz"}], "no input_uri column"),
        ([{"input_uri": "a.nii.gz"}, {"input_uri": ""}], "row 2: input_uri is empty"),
        ([{"id": "../up", "input_uri": "a.nii.gz"}], "not a safe folder name"),
        ([{"id": "x", "input_uri": "a.nii.gz"}, {"id": "X", "input_uri": "b.nii.gz"}], "same item id"),
        (
            [{"input_uri": "a.nii.gz", "output": "o"}, {"input_uri": "b.nii.gz", "output": "o"}],
            "output folder",
        ),
    ],
)
def test_bad_manifests_say_what_is_wrong(tmp_path: Path, rows: list[dict[str, object]], message: str) -> None:
    manifest = write_manifest(tmp_path, "bad.jsonl", rows)
    with pytest.raises(BatchInputError, match=message):
        work_items(manifest, str(tmp_path / "out"))


def test_unparseable_manifest(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("{not json\n")
    with pytest.raises(BatchInputError, match="Cannot parse"):
        work_items(str(tmp_path / "m.jsonl"), str(tmp_path / "out"))


def test_work_items_travel_as_json() -> None:
    item = WorkItem("a", "s3://b/a.nii.gz", "s3://o/a", "body")
    assert WorkItem.from_json(item.to_json()) == item


def test_a_manifest_of_dicomweb_series(tmp_path: Path) -> None:
    series = "dicomweb+https://pacs/dicom-web/studies/1.2.3/series/1.2.3.4"
    (tmp_path / "m.jsonl").write_text(json.dumps({"input_uri": series}) + "\n")
    (item,) = work_items(str(tmp_path / "m.jsonl"), "s3://out")
    assert item == WorkItem("1.2.3.4", series, "s3://out/1.2.3.4")


def test_a_dicomweb_search_gives_one_item_per_series(monkeypatch: pytest.MonkeyPatch) -> None:
    from raytseg import dicomweb

    search = "dicomweb+https://pacs/dicom-web/series?Modality=CT"
    found = [f"dicomweb+https://pacs/dicom-web/studies/1.2/series/{uid}" for uid in ("1.2.5", "1.2.6")]
    monkeypatch.setattr(dicomweb, "find_series", lambda uri: found if uri == search else [])
    items = work_items(search, "s3://out")
    assert [(i.id, i.input, i.output) for i in items] == [
        ("1.2.5", found[0], "s3://out/1.2.5"),
        ("1.2.6", found[1], "s3://out/1.2.6"),
    ]
    with pytest.raises(BatchInputError, match="names no series"):
        work_items("dicomweb+https://pacs/dicom-web/series?Modality=MR", "s3://out")
