"""The ``raytseg`` command line end to end, on tiny synthetic weights (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import raytseg
from raytseg.cli import main
from raytseg.errors import InvalidOptionError
from raytseg.pipeline.labeltable import read_label_table

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "totalseg-reference"
CT = REFERENCE / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)
    return root


@pytest.fixture
def env(weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    return weights


@pytest.mark.usefixtures("env")
def test_segment_writes_every_class_statistics_and_preview(tmp_path: Path) -> None:
    out, report = tmp_path / "seg", tmp_path / "report.json"
    args = ["-i", str(CT), "-o", str(out), "--fast", "-s", "-p", "-d", "cpu", "-q", "-rp", str(report)]
    assert main(["segment", *args]) == 0
    names = {p.name for p in out.iterdir()}
    masks = sorted(n for n in names if n.endswith(".nii.gz"))
    assert len(masks) == 117
    run = json.loads(report.read_text())
    assert (run["task"], run["device"], run["fast"], run["multilabel"]) == ("total", "cpu", True, False)
    assert (run["input"], run["output"], run["num_classes"]) == (str(CT), str(out), 117)
    assert run["classes"]["5"] == "liver"
    assert run["output_files"] == masks
    assert len(run["outputs"]) == 117 + 2  # the masks, statistics.json, the preview
    assert set(run["timings"]) == {"preprocess", "model", "postprocess", "total"}
    assert list(run["backends"].values()) == ["torch"]  # auto on a CPU
    assert {"statistics.json", "preview_total.png", "liver.nii.gz"} <= names
    liver = nib.load(out / "liver.nii.gz")
    assert liver.shape == nib.load(CT).shape
    assert liver.get_data_dtype() == np.uint8
    assert len(json.loads((out / "statistics.json").read_text())) == 117


@pytest.mark.usefixtures("env")
def test_python_api_returns_the_multilabel_image(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    img = raytseg.segment(nib.load(CT), task="total", fast=True, device="cpu", report=report)
    assert isinstance(img, nib.Nifti1Image)
    run = json.loads(report.read_text())
    assert (run["input"], run["output"], run["outputs"], run["output_files"]) == ("Nifti1Image", None, [], [])
    assert read_label_table(img)[5] == "liver"
    img2, stats = raytseg.segment(
        str(CT), tmp_path / "ml.nii.gz", fast=True, ml=True, statistics=True, device="cpu"
    )
    assert (tmp_path / "ml.nii.gz").exists()
    assert (tmp_path / "statistics.json").exists()
    assert "liver" in stats
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(img2.dataobj))


@pytest.mark.usefixtures("env")
def test_s_path_writes_statistics_there_and_not_into_the_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # -s some/path.json: relative to the working folder
    out = tmp_path / "seg"
    args = ["-i", str(CT), "-o", str(out), "--fast", "-rs", "liver", "spleen", "-s", "some/path.json"]
    assert main(["segment", *args, "-d", "cpu", "-q"]) == 0
    assert set(json.loads((tmp_path / "some" / "path.json").read_text())) == {"liver", "spleen"}
    assert sorted(p.name for p in out.iterdir()) == ["liver.nii.gz", "spleen.nii.gz"]
    placed = tmp_path / "api" / "placed.json"
    _, stats = raytseg.segment(
        str(CT), tmp_path / "ml" / "seg.nii.gz", fast=True, ml=True, statistics=placed, device="cpu"
    )
    assert json.loads(placed.read_text()).keys() == stats.keys()
    assert [p.name for p in (tmp_path / "ml").iterdir()] == ["seg.nii.gz"]
    placed.unlink()
    raytseg.segment(nib.load(CT), fast=True, statistics=str(placed), device="cpu")  # no output
    assert placed.exists()


@pytest.mark.usefixtures("env")
def test_save_lowres_keeps_the_6mm_grid_and_refuses_what_needs_the_input_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "seg.nii.gz", tmp_path / "report.json"
    args = ["-i", str(CT), "-o", str(out), "--ml", "-ff", "-sl", "-d", "cpu", "-q", "-rp", str(report)]
    assert main(["segment", *args]) == 0
    img, ct = nib.load(out), nib.load(CT)
    assert img.shape == tuple(round(n / 2) for n in ct.shape[:3]) != ct.shape  # 3 -> 6 mm, 50.5 -> 50
    np.testing.assert_allclose(np.diag(img.affine)[:3], 2 * np.diag(ct.affine)[:3])
    np.testing.assert_allclose(img.affine[:3, 3], ct.affine[:3, 3])
    assert json.loads(report.read_text())["save_lowres"] is True
    refused = tmp_path / "refused"
    assert main(["segment", "-i", str(CT), "-o", str(refused), "-ff", "-sl", "-p", "-d", "cpu", "-q"]) == 1
    assert "the preview (-p) need them on the input's" in capsys.readouterr().err
    assert not refused.exists()


def test_missing_weights_is_one_line_with_the_fix_and_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(tmp_path / "empty"))
    out = tmp_path / "seg"
    assert main(["segment", "-i", str(CT), "-o", str(out), "-d", "cpu", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("raytseg: error: ")
    assert "raytseg weights download -t total" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.usefixtures("env")
def test_unreadable_input_is_a_user_error_without_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(CT.read_bytes()[:5000])  # truncated gzip
    out = tmp_path / "seg"
    assert main(["segment", "-i", str(bad), "-o", str(out), "--fast", "-d", "cpu", "-q"]) == 1
    assert "raytseg: error:" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.usefixtures("env")
def test_dicom_outputs_of_a_dicom_series(tmp_path: Path) -> None:
    import pydicom

    out = tmp_path / "seg"
    flags = ["--fast", "-d", "cpu", "-q", "-ot", "nifti,dicom", "dicom_seg", "--dicom_seg_type", "labelmap"]
    # A subset the synthetic weights find: the RTSTRUCT of every noisy random-weight class took
    # most of a minute (the service and batch tests write those).
    flags += ["-rs", "colon", "urinary_bladder", "kidney_cyst_right", "scapula_right"]
    assert main(["segment", "-i", str(REFERENCE / "example_ct_dicom"), "-o", str(out), *flags]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["segmentation.nii.gz", "segmentation_rtstruct.dcm", "segmentation_seg.dcm"]
    seg = pydicom.dcmread(out / "segmentation_seg.dcm")
    multilabel = nib.load(out / "segmentation.nii.gz")
    present = set(np.unique(np.asarray(multilabel.dataobj)).tolist()) - {0}
    assert len(present) >= 3
    table = read_label_table(multilabel)
    assert {s.SegmentLabel for s in seg.SegmentSequence} - {"Background"} == {table[k] for k in present}
    assert {
        r.ROIName for r in pydicom.dcmread(out / "segmentation_rtstruct.dcm").StructureSetROISequence
    } == {table[k] for k in present}


@pytest.mark.usefixtures("env")
def test_dicom_output_of_a_nifti_is_refused_before_segmenting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "seg"
    assert (
        main(["segment", "-i", str(CT), "-o", str(out), "--fast", "-ot", "dicom_seg", "-d", "cpu", "-q"]) == 1
    )
    err = capsys.readouterr().err
    assert "this input is NIfTI" in err
    assert "Predicting" not in err
    assert not out.exists()


def test_unknown_task_lists_valid_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["segment", "-i", str(CT), "-o", str(tmp_path / "o"), "-ta", "totl", "-q"]) == 1
    assert "Valid tasks" in capsys.readouterr().err


def test_tasks_json_lists_every_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)
    assert tasks["total"]["classes"]["5"] == "liver"
    assert tasks["heartchambers_highres"]["license_required"] is True
    assert len(tasks) == 52


def test_stats_reproduces_totalsegmentator_statistics(tmp_path: Path) -> None:
    out = tmp_path / "statistics.json"
    seg = REFERENCE / "example_seg_fast.nii.gz"
    assert main(["stats", "-i", str(CT), "--seg", str(seg), "-o", str(out), "-sii"]) == 0
    assert json.loads(out.read_text()) == json.loads(
        (REFERENCE / "example_seg_fast" / "statistics.json").read_text()
    )


def test_combine_masks_lung(tmp_path: Path) -> None:
    out = tmp_path / "lung.nii.gz"
    assert (
        main(["combine-masks", "-i", str(REFERENCE / "example_seg_fast"), "-o", str(out), "-m", "lung"]) == 0
    )
    lung = np.asanyarray(nib.load(out).dataobj)
    seg = np.asanyarray(nib.load(REFERENCE / "example_seg_fast.nii.gz").dataobj)
    np.testing.assert_array_equal(lung, np.isin(seg, [10, 11, 12, 13, 14]).astype(np.uint8))


def test_synth_prints_folders_and_says_weights_are_random(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["weights", "synth", "-t", "body", "--fast", "--tiny", "-o", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Dataset300_body_6mm_1559subj" in captured.out
    assert "meaningless" in captured.err


def test_importing_the_cli_catalogue_and_records_loads_neither_torch_nor_ray() -> None:
    code = (
        "import sys, raytseg, raytseg.cli, raytseg.tasks, raytseg.pipeline.records, raytseg.pipeline.plan, "
        "raytseg.metrics, raytseg.config; raytseg.tasks.load_catalog();"
        "heavy = [m for m in ('torch', 'ray', 'nnunetv2', 'SimpleITK') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_totalsegmentator_list_flags_print_and_exit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["segment", "-lc", "liver_vessels"])
    assert done.value.code == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["   1  liver_vessels", "   2  liver_tumor"]
    with pytest.raises(SystemExit) as done:
        main(["segment", "--list-tasks"])
    assert done.value.code == 0
    assert "lung_vessels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["segment", "-lc", "nope"])
    assert done.value.code == 1
    assert "Unknown task 'nope'" in capsys.readouterr().err


def test_get_modality_writes_totalsegmentators_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("xgboost")
    out = tmp_path / "modality.json"
    assert main(["get-modality", "-i", str(CT), "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == {"modality": "ct", "probability": 1.0}
    assert out.read_text() == capsys.readouterr().out.strip()


def test_get_modality_from_rois_segments_with_total_mr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xgboost")
    from raytseg.weights.synth import synthesize_task

    synthesize_task("total_mr", tmp_path / "weights", fast=True, tiny=True)
    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    out = tmp_path / "modality.json"
    assert (
        main(
            [
                "get-modality",
                "-i",
                str(REFERENCE / "example_mr_sm.nii.gz"),
                "-o",
                str(out),
                "-n",
                "-d",
                "cpu",
                "-q",
            ]
        )
        == 0
    )
    answer = json.loads(out.read_text())
    assert answer["modality"] in ("ct", "mr")
    assert 0.5 <= answer["probability"] <= 1.0


@pytest.mark.usefixtures("env")
def test_thread_counts_and_crop_path_change_nothing_in_the_outputs(tmp_path: Path) -> None:
    # -rs crops with a first model: the pass whose masks TotalSegmentator's -cp once pointed to.
    flags = ["-i", str(CT), "--fast", "-d", "cpu", "-q", "-rs", "liver", "spleen", "kidney_left"]
    assert main(["segment", *flags, "-o", str(tmp_path / "a")]) == 0
    others = ["-nr", "4", "-ns", "1", "-cp", str(tmp_path / "nowhere")]
    assert main(["segment", *flags, "-o", str(tmp_path / "b"), *others]) == 0
    assert not (tmp_path / "nowhere").exists()
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-t", "project7"], "NORA platform's own command"),
        (["--test", "1"], "TotalSegmentator's source tree"),
        (["-ms", "small"], "model_size small exists only for task total_v3"),
    ],
)
@pytest.mark.usefixtures("env")
def test_flags_that_cannot_mean_the_same_are_refused(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["segment", "-i", str(CT), "-o", str(tmp_path / "o"), "--fast", "-d", "cpu", *flags]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_debug_shows_where_an_error_happened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.nii.gz"
    assert main(["segment", "-i", str(missing), "-o", str(tmp_path / "o"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert f"Failed on input {missing}, task total" in err
    assert "Traceback" in err


@pytest.mark.usefixtures("env")
def test_v1_order_per_class_files_are_totalsegmentator_1s_classes(tmp_path: Path) -> None:
    from raytseg.tasks import get_task

    v1 = get_task("total").v1_classes
    assert v1 is not None
    flags = ["-i", str(CT), "--fast", "-d", "cpu", "-q", "-v1o"]
    assert main(["segment", *flags, "-o", str(tmp_path / "ml.nii.gz"), "--ml"]) == 0
    assert main(["segment", *flags, "-o", str(tmp_path / "classes")]) == 0
    multilabel = nib.load(tmp_path / "ml.nii.gz")
    assert read_label_table(multilabel) == v1
    data = np.asarray(multilabel.dataobj)
    # Unlike TotalSegmentator 2.18, whose per-class files keep version 2's names and read
    # them from the renumbered labels (mislabelled), each file is its v1 class's voxels.
    assert {p.name for p in (tmp_path / "classes").iterdir()} >= {f"{name}.nii.gz" for name in v1.values()}
    assert not (tmp_path / "classes" / "skull.nii.gz").exists()
    for idx, name in v1.items():
        mask = np.asarray(nib.load(tmp_path / "classes" / f"{name}.nii.gz").dataobj)
        assert np.array_equal(mask > 0, data == idx), name
    assert len(np.unique(data)) > 2


@pytest.mark.usefixtures("env")
def test_backend_openvino_from_the_cli_and_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    monkeypatch.setenv("RAYTSEG_CACHE_DIR", str(tmp_path / "cache"))
    out, report = tmp_path / "ov.nii.gz", tmp_path / "report.json"
    args = ["-i", str(CT), "-o", str(out), "--fast", "--ml", "-d", "cpu", "-q", "--backend", "openvino"]
    assert main(["segment", *args, "-rp", str(report)]) == 0
    assert len(list((tmp_path / "cache" / "openvino").iterdir())) == 1  # converted once, cached
    [(model, backend)] = json.loads(report.read_text())["backends"].items()
    assert (model.split("/")[0], backend) == ("297", "openvino")
    ours = np.asarray(nib.load(out).dataobj)
    api = raytseg.segment(str(CT), fast=True, device="cpu", backend="openvino")
    assert isinstance(api, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asarray(api.dataobj), ours)
    with pytest.raises(InvalidOptionError, match="Unknown backend"):
        raytseg.segment(str(CT), fast=True, device="cpu", backend="onnx")


def test_task_auto_chooses_from_the_image_and_reports_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xgboost")
    from raytseg.weights.synth import synthesize_task

    for task in ("total", "total_mr"):
        synthesize_task(task, tmp_path / "weights", fast=True, tiny=True)
    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    runs = {}
    for name in ("example_ct_sm", "example_mr_sm"):
        image, report = REFERENCE / f"{name}.nii.gz", tmp_path / f"{name}.json"
        args = [
            "-i",
            str(image),
            "-o",
            str(tmp_path / name),
            "-ta",
            "auto",
            "--fast",
            "--ml",
            "-rp",
            str(report),
        ]
        assert main(["segment", *args, "-d", "cpu", "-q"]) == 0
        runs[name] = json.loads(report.read_text())
    ct = runs["example_ct_sm"]
    assert ct["task_choice"] == {
        "task": "total",
        "modality": "CT",
        "reason": "intensity classifier: ct (probability 1)",
    }
    assert (ct["task"], ct["num_classes"]) == ("total", 117)
    # The reference MR fools the intensity classifier; having no air, it goes to the ROI one,
    # whose answer (random weights here) is what get-modality -n says.
    mr = runs["example_mr_sm"]
    modality = tmp_path / "modality.json"
    args = ["-i", str(REFERENCE / "example_mr_sm.nii.gz"), "-o", str(modality), "-n", "-d", "cpu", "-q"]
    assert main(["get-modality", *args]) == 0
    roi = json.loads(modality.read_text())
    assert mr["task_choice"]["task"] == mr["task"] == {"ct": "total", "mr": "total_mr"}[roi["modality"]]
    assert mr["task_choice"]["reason"].endswith(
        f"ROI classifier: {roi['modality']} (probability {roi['probability']:g})"
    )
    assert "minimum -47" in mr["task_choice"]["reason"]
