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

from raytseg.errors import InvalidOptionError
from raytseg.pipeline.export import (
    MULTILABEL_NAME,
    check_model_grid,
    class_mask_files,
    multilabel_nifti_bytes,
    nifti_gz_bytes,
    output_files,
    reads_image,
    write_segmentation,
)
from raytseg.pipeline.labeltable import read_label_table
from raytseg.pipeline.records import OutputOptions, Segmentation, SegmentOptions, Volume
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


def _volume(seg: Segmentation) -> Volume:
    return Volume(np.zeros(seg.labels.shape, np.int16), seg.affine, seg.header)


def test_write_segmentation_folder(tmp_path: Path) -> None:
    seg = _synthetic_seg()
    seg = Segmentation(
        seg.labels, seg.affine, seg.header, seg.label_map, "body", {"class_1": {"volume": 1.0}}
    )
    out = tmp_path / "segmentations"
    written = write_segmentation(
        seg, _volume(seg), str(out), OutputOptions(derived_masks=False, preview=True)
    )
    names = [f"{c}.nii.gz" for c in seg.label_map.values()] + ["preview_body.png", "statistics.json"]
    assert written == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left
    assert (out / "statistics.json").read_text() == json.dumps(seg.statistics, indent=4)
    assert dict(class_mask_files(seg))["class_2.nii.gz"] == (out / "class_2.nii.gz").read_bytes()


def test_output_files_are_what_write_segmentation_writes(tmp_path: Path) -> None:
    seg = _synthetic_seg()
    for output in (OutputOptions(), OutputOptions(ml=True, preview=True)):
        listed = dict(output_files(seg, _volume(seg), output))
        written = write_segmentation(seg, _volume(seg), str(tmp_path / str(output.ml)), output)
        assert {Path(w).name: Path(w).read_bytes() for w in written} == listed


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii"])
def test_write_segmentation_ml_file_puts_statistics_next_to_it(tmp_path: Path, name: str) -> None:
    seg = _synthetic_seg()
    seg = Segmentation(
        seg.labels, seg.affine, seg.header, seg.label_map, seg.task, {"class_1": {"volume": 2.0}}
    )
    target = tmp_path / "new" / name
    written = write_segmentation(seg, _volume(seg), str(target), OutputOptions(ml=True))
    assert written == [str(target), str(tmp_path / "new" / "statistics.json")]
    img = nib.load(target)  # .nii uncompressed, .nii.gz gzip: as nib.save writes them
    assert read_label_table(img) == seg.label_map
    np.testing.assert_array_equal(np.asarray(img.dataobj), seg.labels)


def test_write_segmentation_ml_into_a_folder_names_the_file_segmentation(tmp_path: Path) -> None:
    seg = _synthetic_seg()
    written = write_segmentation(seg, _volume(seg), str(tmp_path / "out"), OutputOptions(ml=True))
    assert written == [str(tmp_path / "out" / MULTILABEL_NAME)]
    assert MULTILABEL_NAME == "segmentation.nii.gz"


def test_a_placed_file_goes_to_its_path_and_not_into_the_folder(tmp_path: Path) -> None:
    seg = _synthetic_seg()
    seg = Segmentation(
        seg.labels, seg.affine, seg.header, seg.label_map, seg.task, {"class_1": {"volume": 2.0}}
    )
    out, placed = tmp_path / "out", str(tmp_path / "elsewhere" / "stats.json")
    written = write_segmentation(
        seg, _volume(seg), str(out), OutputOptions(ml=True), {"statistics.json": placed}
    )
    assert written == [str(out / MULTILABEL_NAME), placed]
    assert [p.name for p in out.iterdir()] == [MULTILABEL_NAME]
    assert Path(placed).read_text() == json.dumps(seg.statistics, indent=4)
    # -ss, and no target at all (the Python API's output=None; DICOM outputs without a DICOMweb
    # server are not even made): the placed file alone
    cases = (
        (str(tmp_path / "skipped"), OutputOptions(skip_saving=True)),
        (None, OutputOptions()),
        (None, OutputOptions(output_type=("dicom_seg",))),
    )
    for i, (target, output) in enumerate(cases):
        again = str(tmp_path / f"again_{i}.json")
        written = write_segmentation(seg, _volume(seg), target, output, {"statistics.json": again})
        assert written == [again]
        assert Path(again).read_text() == json.dumps(seg.statistics, indent=4)
    assert list((tmp_path / "skipped").iterdir()) == []


def test_write_segmentation_to_fsspec_uri() -> None:
    import fsspec

    seg = _synthetic_seg()
    volume = _volume(seg)
    written = write_segmentation(
        seg, volume, "memory://raytseg-test/case1/seg.nii.gz", OutputOptions(ml=True)
    )
    assert written == ["memory://raytseg-test/case1/seg.nii.gz"]
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/raytseg-test/case1/seg.nii.gz") == multilabel_nifti_bytes(seg)
    written = write_segmentation(seg, volume, "memory://raytseg-test/case1/masks", OutputOptions())
    assert written[0] == "memory://raytseg-test/case1/masks/class_1.nii.gz"
    assert len(written) == len(seg.label_map)


def test_nifti_gz_bytes_equal_nib_save(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    nib.save(img, tmp_path / "a.nii.gz")
    assert nifti_gz_bytes(img) == (tmp_path / "a.nii.gz").read_bytes()


def test_skip_saving_writes_statistics_and_the_preview_only() -> None:
    seg = _synthetic_seg()
    seg = Segmentation(
        seg.labels, seg.affine, seg.header, seg.label_map, "body", {"class_1": {"volume": 1.0}}
    )
    for ml in (False, True):
        output = OutputOptions(ml=ml, skip_saving=True, preview=True)
        assert [name for name, _ in output_files(seg, _volume(seg), output)] == [
            "preview_body.png",
            "statistics.json",
        ]


def test_reads_image_names_the_files_that_read_the_input_voxels() -> None:
    assert reads_image(OutputOptions(preview=True), "total")
    assert reads_image(OutputOptions(radiomics=True), "total")  # statistics_radiomics.json
    assert reads_image(OutputOptions(), "body")  # skin.nii.gz
    assert not reads_image(OutputOptions(), "total")
    assert not reads_image(OutputOptions(ml=True), "body")
    assert not reads_image(OutputOptions(derived_masks=False), "body")
    assert not reads_image(OutputOptions(skip_saving=True), "body")


@pytest.mark.parametrize(
    ("output", "task", "phrase"),
    [
        (OutputOptions(output_type=("nifti", "dicom_seg")), "total", "DICOM outputs"),
        (OutputOptions(preview=True), "total", "the preview"),
        (OutputOptions(radiomics=True), "total", "radiomics"),
        (OutputOptions(), "body", "add -ndm"),
    ],
)
def test_save_lowres_refuses_outputs_on_the_input_grid(output: OutputOptions, task: str, phrase: str) -> None:
    lowres = SegmentOptions(task=task, fast=True, save_lowres=True)
    with pytest.raises(InvalidOptionError, match=phrase):
        check_model_grid(lowres, output)
    check_model_grid(lowres.model_copy(update={"save_lowres": False}), output)  # without -sl: fine


def test_save_lowres_takes_nifti_statistics_and_skipped_outputs() -> None:
    lowres = SegmentOptions(task="body", fast=True, save_lowres=True, statistics=True)
    check_model_grid(lowres.model_copy(update={"task": "total"}), OutputOptions())
    for output in (
        OutputOptions(ml=True),  # no derived masks without per-class files
        OutputOptions(derived_masks=False),
        OutputOptions(output_type=("dicom_seg",), skip_saving=True),  # nothing written
    ):
        check_model_grid(lowres, output)
