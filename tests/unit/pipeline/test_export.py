"""Export stage: files byte-identical to TotalSegmentator's."""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import InvalidImageError, InvalidOptionError, UnreadableImageError
from raytseg.pipeline.export import (
    add_label_table,
    class_mask_files,
    derived_body_masks,
    label_table_xml,
    multilabel_nifti_bytes,
    nifti_gz_bytes,
    read_label_table,
    write_segmentation,
)
from raytseg.pipeline.records import Segmentation, Volume
from raytseg.tasks import get_task


def _run_reference(python: Path, code: str, cwd: Path) -> None:
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def ct(reference_data: Path) -> nib.Nifti1Image:
    return nib.load(reference_data / "example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def fast_seg(reference_data: Path, ct: nib.Nifti1Image) -> Segmentation:
    """example_seg_fast as the postprocess stage would hand it over (input header, uint8)."""
    labels = np.asarray(nib.load(reference_data / "example_seg_fast.nii.gz").dataobj)
    header = ct.header.copy()
    header.set_data_dtype(np.uint8)
    return Segmentation(labels, ct.affine, header, dict(get_task("total").classes), "total")


def _synthetic_seg(shape: tuple[int, int, int] = (23, 17, 11), n_classes: int = 6) -> Segmentation:
    rng = np.random.default_rng(0)
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(1, n_classes - 1):  # the last class stays empty
        i, j, m = (rng.integers(0, s - 4) for s in shape)
        labels[i : i + 4, j : j + 3, m : m + 2] = k
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.5]
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    label_map = {k: f"class_{k}" for k in range(1, n_classes + 1)}
    return Segmentation(labels, affine, header, label_map, "synthetic")


# --- label table -------------------------------------------------------------------


def test_label_table_equals_reference_file_extension(reference_data: Path) -> None:
    img = nib.load(reference_data / "example_seg_fast.nii.gz")
    total = get_task("total").classes
    assert img.header.extensions[0].get_code() == 0
    assert img.header.extensions[0].get_content() == label_table_xml(total)
    assert read_label_table(img) == total
    assert list(read_label_table(img)) == list(total)


def test_add_label_table_round_trips_and_leaves_input_alone() -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    names = {3: "a & b", 1: "<odd>", 250: "ünïcode", 12: ""}
    out = add_label_table(img, names)
    assert len(img.header.extensions) == 0
    assert read_label_table(out) == names
    reloaded = nib.Nifti1Image.from_bytes(out.to_bytes())
    assert read_label_table(reloaded) == names


def test_read_label_table_without_table_says_what_to_do() -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    with pytest.raises(InvalidImageError, match="no label table"):
        read_label_table(img)


def test_read_label_table_damaged() -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, b"<CaretExtension><Label Key='x'>"))
    with pytest.raises(UnreadableImageError, match="damaged"):
        read_label_table(img)


def test_read_label_table_refuses_entity_declarations() -> None:
    xml = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><CaretExtension><Label Key="1">&a;</Label>'
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml + b"</CaretExtension>"))
    with pytest.raises(UnreadableImageError, match="DOCTYPE"):
        read_label_table(img)


@pytest.mark.reference
def test_label_table_bytes_equal_totalsegmentator(tmp_path: Path, ts_python: Path) -> None:
    maps = [
        {1: "liver"},
        {k: f"c{k}" for k in range(1, 30)},
        {5: "kidney_left", 2: "spleen", 117: "costal_cartilages", 13: "x y"},
        dict(get_task("body").classes),
    ]
    (tmp_path / "maps.json").write_text(json.dumps([list(m.items()) for m in maps]))
    _run_reference(
        ts_python,
        "import json, numpy as np, nibabel as nib\n"
        "from totalsegmentator.nifti_ext_header import add_label_map_to_nifti\n"
        "for i, items in enumerate(json.load(open('maps.json'))):\n"
        "    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))\n"
        "    img = add_label_map_to_nifti(img, {int(k): v for k, v in items})\n"
        "    open(f'ext{i}.xml', 'wb').write(img.header.extensions[0].get_content())\n",
        tmp_path,
    )
    for i, label_map in enumerate(maps):
        assert label_table_xml(label_map) == (tmp_path / f"ext{i}.xml").read_bytes()


# --- files ---------------------------------------------------------------------------


def test_multilabel_bytes_equal_reference_file(reference_data: Path, fast_seg: Segmentation) -> None:
    assert multilabel_nifti_bytes(fast_seg) == (reference_data / "example_seg_fast.nii.gz").read_bytes()


def test_class_files_equal_reference_files(reference_data: Path, fast_seg: Segmentation) -> None:
    files = list(class_mask_files(fast_seg))
    assert [name for name, _ in files] == [f"{c}.nii.gz" for c in fast_seg.label_map.values()]
    for name, data in files:
        assert data == (reference_data / "example_seg_fast" / name).read_bytes(), name


@pytest.mark.parametrize("order", ["C", "F"])
def test_class_files_equal_nib_save(tmp_path: Path, order: str) -> None:
    seg = _synthetic_seg()
    seg = Segmentation(np.asarray(seg.labels, order=order), seg.affine, seg.header, seg.label_map, seg.task)
    files = dict(class_mask_files(seg))
    assert list(files) == [f"{c}.nii.gz" for c in seg.label_map.values()]
    for k, name in seg.label_map.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image((seg.labels == k).astype(np.uint8), seg.affine, seg.header), path)
        assert files[path.name] == path.read_bytes(), name
        img = nib.Nifti1Image.from_bytes(gzip.decompress(files[path.name]))
        assert img.header.extensions == nib.nifti1.Nifti1Extensions()
        assert img.get_data_dtype() == np.uint8


def test_empty_classes_share_one_encoding() -> None:
    seg = _synthetic_seg()
    seg = Segmentation(seg.labels, seg.affine, seg.header, {**seg.label_map, 99: "absent"}, seg.task)
    files = dict(class_mask_files(seg))
    assert files["absent.nii.gz"] is files["class_6.nii.gz"]
    assert not np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(files["absent.nii.gz"])).dataobj).any()


def test_class_files_of_a_large_volume_are_fast(reference_data: Path, fast_seg: Segmentation) -> None:
    from scipy.ndimage import zoom

    small = fast_seg.labels
    labels = zoom(small, np.divide((470, 390, 220), small.shape), order=0)
    seg = Segmentation(labels, fast_seg.affine, fast_seg.header, fast_seg.label_map, "total")
    started = time.perf_counter()
    files = list(class_mask_files(seg))
    elapsed = time.perf_counter() - started
    assert len(files) == 117
    assert elapsed < 10.0, f"117 class files took {elapsed:.1f} s"


def test_write_segmentation_folder(tmp_path: Path) -> None:
    seg = _synthetic_seg()
    seg = Segmentation(
        seg.labels, seg.affine, seg.header, seg.label_map, seg.task, {"class_1": {"volume": 1.0}}
    )
    out = tmp_path / "segmentations"
    written = write_segmentation(seg, str(out), ml=False, extra_files={"body.nii.gz": b"x"})
    names = [f"{c}.nii.gz" for c in seg.label_map.values()] + ["body.nii.gz", "statistics.json"]
    assert written == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left
    assert (out / "statistics.json").read_text() == json.dumps(seg.statistics, indent=4)
    assert dict(class_mask_files(seg))["class_2.nii.gz"] == (out / "class_2.nii.gz").read_bytes()


def test_write_segmentation_ml_puts_statistics_next_to_file(tmp_path: Path) -> None:
    seg = _synthetic_seg()
    seg = Segmentation(
        seg.labels, seg.affine, seg.header, seg.label_map, seg.task, {"class_1": {"volume": 2.0}}
    )
    target = tmp_path / "new" / "seg.nii.gz"
    written = write_segmentation(seg, str(target), ml=True)
    assert written == [str(target), str(tmp_path / "new" / "statistics.json")]
    img = nib.load(target)
    assert read_label_table(img) == seg.label_map
    np.testing.assert_array_equal(np.asarray(img.dataobj), seg.labels)


def test_write_segmentation_to_fsspec_uri() -> None:
    import fsspec

    seg = _synthetic_seg()
    written = write_segmentation(seg, "memory://raytseg-test/case1/seg.nii.gz", ml=True)
    assert written == ["memory://raytseg-test/case1/seg.nii.gz"]
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/raytseg-test/case1/seg.nii.gz") == multilabel_nifti_bytes(seg)
    written = write_segmentation(seg, "memory://raytseg-test/case1/masks", ml=False)
    assert written[0] == "memory://raytseg-test/case1/masks/class_1.nii.gz"
    assert len(written) == len(seg.label_map)


# --- body task ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def body_case(ct: nib.Nifti1Image) -> tuple[Segmentation, Volume]:
    from scipy.ndimage import binary_fill_holes

    data = np.asarray(ct.dataobj)
    body = binary_fill_holes(data > -400)
    labels = np.zeros(data.shape, dtype=np.uint8)
    labels[body] = 1
    labels[:, :, :8][body[:, :, :8]] = 2
    header = ct.header.copy()
    header.set_data_dtype(np.uint8)
    seg = Segmentation(labels, ct.affine, header, dict(get_task("body").classes), "body")
    return seg, Volume(data, ct.affine, ct.header)


def test_derived_body_masks(body_case: tuple[Segmentation, Volume]) -> None:
    seg, volume = body_case
    files = derived_body_masks(seg, volume)
    body = nib.Nifti1Image.from_bytes(gzip.decompress(files["body.nii.gz"]))
    skin = nib.Nifti1Image.from_bytes(gzip.decompress(files["skin.nii.gz"]))
    np.testing.assert_array_equal(np.asarray(body.dataobj), seg.labels > 0)
    skin_data = np.asarray(skin.dataobj)
    assert skin.get_data_dtype() == np.uint8
    assert skin_data.any()
    assert np.all(volume.data[skin_data > 0] > -200)


def test_derived_body_masks_need_both_classes(body_case: tuple[Segmentation, Volume]) -> None:
    seg, volume = body_case
    partial = Segmentation(seg.labels, seg.affine, seg.header, {1: "body_trunc"}, "body")
    with pytest.raises(InvalidOptionError, match="body_extremities"):
        derived_body_masks(partial, volume)


@pytest.mark.reference
def test_derived_body_masks_equal_totalsegmentator(
    tmp_path: Path, ts_python: Path, reference_data: Path, body_case: tuple[Segmentation, Volume]
) -> None:
    seg, volume = body_case
    ct_path = reference_data / "example_ct_sm.nii.gz"
    write_segmentation(seg, str(tmp_path / "seg"), ml=False)
    _run_reference(
        ts_python,
        "from pathlib import Path\n"
        "import nibabel as nib\n"
        "from totalsegmentator.libs import combine_masks\n"
        "from totalsegmentator.postprocessing import extract_skin\n"
        "out = Path('seg')\n"
        "nib.save(combine_masks(out, 'body'), 'body.nii.gz')\n"
        f"skin = extract_skin(nib.load({str(ct_path)!r}), nib.load('body.nii.gz'))\n"
        "nib.save(skin, 'skin.nii.gz')\n",
        tmp_path,
    )
    files = derived_body_masks(seg, volume)
    assert files["body.nii.gz"] == (tmp_path / "body.nii.gz").read_bytes()
    assert files["skin.nii.gz"] == (tmp_path / "skin.nii.gz").read_bytes()


def test_nifti_gz_bytes_equal_nib_save(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    nib.save(img, tmp_path / "a.nii.gz")
    assert nifti_gz_bytes(img) == (tmp_path / "a.nii.gz").read_bytes()
