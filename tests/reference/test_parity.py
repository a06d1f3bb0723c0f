"""raytseg's outputs equal TotalSegmentator 2.18's for the same weights and input.

Each case runs the reference ``TotalSegmentator`` CLI and ``raytseg segment`` with the
same flags on the real CT/MR/DICOM examples and tiny synthetic weights, then checks:
same file names, shapes, affines, dtype and label table, and per-class Dice ≥ 0.9999.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.cli import main as raytseg_main
from raytseg.pipeline.labeltable import read_label_table

DICE_MIN = 0.9999

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def raytseg_env(tiny_weights: Path) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("RAYTSEG_WEIGHTS", "TOTALSEG_WEIGHTS_PATH")}
    os.environ["RAYTSEG_WEIGHTS"] = str(tiny_weights)
    os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_raytseg(input_path: Path, out: Path, *flags: str, ml: bool = False) -> Path:
    target = out / "seg.nii.gz" if ml else out
    args = ["segment", "-i", str(input_path), "-o", str(target), "-d", "cpu", "-q", *flags]
    assert raytseg_main([*args, "--ml"] if ml else args) == 0
    return target


@dataclass(frozen=True)
class CaseRun:
    """Both tools' outputs for one case: the multilabel file, or the per-class folder with
    both run reports beside it."""

    ours: Path
    theirs: Path
    reports: tuple[Path, Path] | None = None  # ours, theirs (per-class cases)


@pytest.fixture(scope="module")
def case_runs(
    raytseg_env: None,
    totalsegmentator: object,
    reference_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], CaseRun]:
    """``case_runs(case)``: both tools' outputs for a case of ``ML_CASES`` or ``FOLDER_CASES``,
    made once per module: several tests (masks, statistics, report) read the same two runs.
    One after the other: both tools run their torch threads on every core, and side by side
    they were 3x slower than in turn (measured on `total`, 2 cores)."""
    done: dict[str, CaseRun] = {}

    def run(case: str) -> CaseRun:
        if case not in done:
            ml = case in ML_CASES
            image, flags = (ML_CASES if ml else FOLDER_CASES)[case]
            where = tmp_path_factory.mktemp(case)
            reports = None if ml else (where / "report.json", where / "ts_report.json")
            ts_flags = flags if reports is None else (*flags, "-rp", str(reports[1]))
            theirs = totalsegmentator.run(reference_data / image, *ts_flags, ml=ml)  # type: ignore[attr-defined]
            our_flags = flags if reports is None else (*flags, "-rp", str(reports[0]))
            ours = run_raytseg(reference_data / image, where / "out", *our_flags, ml=ml)
            done[case] = CaseRun(ours, theirs, reports)
        return done[case]

    return run


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def assert_same_image(ours: nib.Nifti1Image, theirs: nib.Nifti1Image, name: str) -> None:
    assert ours.shape == theirs.shape, name
    assert ours.get_data_dtype() == theirs.get_data_dtype() == np.uint8, name
    np.testing.assert_allclose(ours.affine, theirs.affine, rtol=0, atol=1e-6, err_msg=name)


def assert_same_multilabel(ours_path: Path, theirs_path: Path) -> dict[str, float]:
    ours, theirs = nib.load(ours_path), nib.load(theirs_path)
    assert_same_image(ours, theirs, ours_path.name)
    labels = read_label_table(theirs)
    assert read_label_table(ours) == labels
    a, b = np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)
    scores = {name: dice(a == idx, b == idx) for idx, name in labels.items()}
    bad = {k: v for k, v in scores.items() if v < DICE_MIN}
    assert not bad, f"classes below Dice {DICE_MIN}: {bad}"
    return scores


def assert_same_folder(ours: Path, theirs: Path) -> None:
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in names:
        if not name.endswith(".nii.gz"):
            continue
        a, b = nib.load(ours / name), nib.load(theirs / name)
        assert_same_image(a, b, name)
        score = dice(np.asanyarray(a.dataobj) > 0, np.asanyarray(b.dataobj) > 0)
        assert score >= DICE_MIN, f"{name}: Dice {score}"


def present_labels(path: Path) -> int:
    return len(np.unique(np.asanyarray(nib.load(path).dataobj))) - 1


ML_CASES = {
    # Statistics do not change the masks; asking for them here lets the statistics test
    # reuse these (slow) reference runs.
    "total": ("example_ct_sm.nii.gz", ("--statistics", "-sii")),
    "total_fast": ("example_ct_sm.nii.gz", ("--fast", "--statistics")),
    "total_mr": ("example_mr_sm.nii.gz", ("-ta", "total_mr")),
    # The body task's 1.5 mm model is the same code path as its 6 mm one (a per-class case
    # below); it left CI to save its 130 s.
    # Classes the synthetic 6 mm / 3 mm crop models find on these images (seeded weights),
    # from three part models (CT) and both MR parts.
    # Also spline order 3 for the crop and main passes and extra statistics (see below).
    "roi_subset": (
        "example_ct_sm.nii.gz",
        ("-rs", "spinal_cord", "kidney_cyst_right", "sacrum", "-ro", "3", "-s", "-sii", "-sx"),
    ),
    "roi_subset_mr": ("example_mr_sm.nii.gz", ("-ta", "total_mr", "-rs", "duodenum", "autochthon_left")),
    "dicom_fast": ("example_ct_dicom", ("--fast",)),
    "fast_force_split": ("example_ct.nii.gz", ("--fast", "-fs")),
    "fast_body_seg": ("example_ct_sm.nii.gz", ("--fast", "-bs")),
    # TotalSegmentator 1's numbering: the label table and the renumbered voxels (classes v1
    # lacked dropped); with a subset, kidney_cyst_right (no v1 class) leaves the table.
    "v1_order_fast": ("example_ct_sm.nii.gz", ("--fast", "-v1o", "--statistics")),
    # Smooth upsampling of the 6 mm masks (--higher_order_resampling_LEGACY, in its other
    # spelling): 16,476 voxels differ from the default upsampling. The 3 mm models need no
    # upsampling on these 3 mm images. Also spline order 3 for the crop and main passes and
    # the input-grid statistics with every option (roi_subset's, which is extended, too).
    "legacy_resampling_roi_subset": (
        "example_ct_sm.nii.gz",
        (
            "-ff",
            "--high_order_resampling_LEGACY",
            "-rs",
            "kidney_cyst_right",
            "sacrum",
            "scapula_right",
            "-ro",
            "3",
            "-s",
            "-sii",
            "-sx",
        ),
    ),
    # -ho: the model gets the image on its own grid; nnU-Net resamples it, and TotalSegmentator's
    # export brings the logits back class box by class box: up from the 6 mm model, and down
    # from 1.5 mm parts after a crop pass.
    "fastest_higher_order": ("example_ct_sm.nii.gz", ("-ff", "-ho")),
    "roi_subset_higher_order": (
        "example_ct_sm.nii.gz",
        ("-rs", "spinal_cord", "kidney_cyst_right", "sacrum", "-ho"),
    ),
    # -sl: the masks stay on the 6 mm model's grid, with its header.
    "fastest_save_lowres": ("example_ct_sm.nii.gz", ("-ff", "-sl")),
    "v1_order_roi_subset": (
        "example_ct_sm.nii.gz",
        ("--fast", "-v1o", "-rs", "urinary_bladder", "colon", "kidney_cyst_right"),
    ),
}


# Slow variants of what the other cases cover, each passed when it left CI (for time; the
# tests' "extended" marker): the 1.5 mm total parts (five parts combine in
# test_small_models_match_totalsegmentator, total_fast takes the statistics of all classes,
# legacy_resampling_roi_subset the crop pass with -ro 3 and the input-grid statistics with
# -sii -sx), the two 1.5 mm MR parts (in CI the MR path is the 3 mm total_mr model's, whose
# statistics get-modality -n compares), and -ho after a crop pass (fastest_higher_order runs
# the cropped export).
EXTENDED = {"total", "roi_subset", "total_mr", "roi_subset_mr", "roi_subset_higher_order"}


def cases(names: Iterable[str]) -> list[Any]:
    """``names`` in order as parameters, the ``EXTENDED`` ones marked so."""
    return [pytest.param(n, marks=pytest.mark.extended) if n in EXTENDED else n for n in sorted(names)]


@pytest.mark.parametrize("case", cases(ML_CASES))
def test_multilabel_output_matches_totalsegmentator(case: str, case_runs: Callable[[str], CaseRun]) -> None:
    run = case_runs(case)
    assert_same_multilabel(run.ours, run.theirs)
    if "-sl" in ML_CASES[case][1]:  # off the input grid: the whole file, header included
        assert run.ours.read_bytes() == run.theirs.read_bytes()
    # Synthetic weights must still produce labels, or the comparison is vacuous.
    assert present_labels(run.theirs) >= (1 if "-rs" in ML_CASES[case][1] else 2)


FOLDER_CASES = {
    "total_fast_classes": ("example_ct_sm.nii.gz", ("--fast",)),
    "body_fast_classes": ("example_ct_sm.nii.gz", ("-ta", "body", "--fast")),
    "dicom_classes": ("example_ct_dicom", ("--fast", "-rs", "liver", "spleen", "aorta")),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_per_class_output_matches_totalsegmentator(case: str, case_runs: Callable[[str], CaseRun]) -> None:
    run = case_runs(case)
    assert_same_folder(run.ours, run.theirs)


# v1_order_fast: statistics keep TotalSegmentator 2's class names (its --fast statistics are
# taken before the renumbering, as raytseg's always are).
@pytest.mark.parametrize(
    "case", cases(["total", "total_fast", "roi_subset", "legacy_resampling_roi_subset", "v1_order_fast"])
)
def test_statistics_match_totalsegmentator(case: str, case_runs: Callable[[str], CaseRun]) -> None:
    run = case_runs(case)
    ours_stats = json.loads((run.ours.parent / "statistics.json").read_text())
    theirs_stats = json.loads((run.theirs.parent / "statistics.json").read_text())
    # Same masks and the same arithmetic: the numbers are equal, not just close.
    assert ours_stats == theirs_stats
    assert list(ours_stats) == list(theirs_stats)


# What differs between two runs by design: software versions of the two environments,
# time, and where the input and output were.
REPORT_RUN_SPECIFIC = {"nnunetv2_version", "torch_version", "runtime_seconds", "input", "output"}


@pytest.mark.parametrize("case", ["total_fast_classes", "dicom_classes"])
def test_run_report_matches_totalsegmentator(case: str, case_runs: Callable[[str], CaseRun]) -> None:
    run = case_runs(case)
    assert run.reports is not None
    ours, theirs = (json.loads(path.read_text()) for path in run.reports)
    assert list(ours)[: len(theirs)] == list(theirs)  # TotalSegmentator's keys first, in its order
    assert {k: v for k, v in ours.items() if k in theirs and k not in REPORT_RUN_SPECIFIC} == {
        k: v for k, v in theirs.items() if k not in REPORT_RUN_SPECIFIC
    }
    assert ours["output"] == str(run.ours)
    assert len(ours["outputs"]) == len(ours["output_files"])


def corner_of_the_ct(reference_data: Path, folder: Path, size: int = 40) -> Path:
    """A corner of the small example CT (``size`` x ``size`` x 16 at 3 mm): quick for 1.5 mm models."""
    image = folder / "corner.nii.gz"
    img = nib.load(reference_data / "example_ct_sm.nii.gz")
    nib.save(img.slicer[30 : 30 + size, 30 : 30 + size, 10:26], image)
    return image


def test_small_models_match_totalsegmentator(
    raytseg_env: None, totalsegmentator: Any, reference_data: Path, tmp_path: Path
) -> None:
    """-ms small: task total_v3's five parts with nnU-Net's residual-encoder plans
    (nnUNetResEncUNetLPlans_8, a ResidualEncoderUNet), as TotalSegmentator loads them."""
    image = corner_of_the_ct(reference_data, tmp_path, size=20)  # five 1.5 mm models, twice
    flags = ("-ta", "total_v3", "-ms", "small")
    theirs = totalsegmentator.run(image, *flags, ml=True)
    ours = run_raytseg(image, tmp_path / "ours", *flags, ml=True)
    assert present_labels(ours) >= 2
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize(
    "extra", [pytest.param((), id="default"), pytest.param(("-ho",), id="ho", marks=pytest.mark.extended)]
)
def test_refined_vertebrae_match_totalsegmentator(
    extra: tuple[str, ...], raytseg_env: None, totalsegmentator: Any, reference_data: Path, tmp_path: Path
) -> None:
    """vertebrae_pp_refined: the vertebrae_body model's pass on the whole image, then the
    vertebrae_pp model, its relabelling, and its labels dilated by 2 mm and clipped to the
    vertebral bodies; with -ho, both passes' cropped export. On a corner of the CT (the
    whole one takes minutes each, measured equal too: 0 voxels differ)."""
    image = corner_of_the_ct(reference_data, tmp_path)
    flags = ("-ta", "vertebrae_pp_refined", *extra)
    theirs = totalsegmentator.run(image, *flags, ml=True)
    ours = run_raytseg(image, tmp_path / "ours", *flags, ml=True)
    assert nib.load(ours).get_fdata().any()  # the synthetic models leave labels after the clip
    assert ours.read_bytes() == theirs.read_bytes()


# -sp PATH: nnU-Net's probabilities of the main pass's last model (the 6 mm model; and the
# last of three 1.5 mm parts after a crop pass: each part overwrites TotalSegmentator's
# file) and its properties beside them as .pkl.
@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(("-ff",), id="fastest"),
        pytest.param(
            ("-rs", "spinal_cord", "kidney_cyst_right", "sacrum"), id="parts", marks=pytest.mark.extended
        ),
    ],
)
def test_save_probabilities_matches_totalsegmentator(
    flags: tuple[str, ...],
    raytseg_env: None,
    totalsegmentator: Any,
    reference_data: Path,
    tmp_path: Path,
) -> None:
    image = reference_data / "example_ct_sm.nii.gz"
    theirs = totalsegmentator.run(image, *flags, "-sp", str(tmp_path / "theirs.npz"), ml=True)
    ours = run_raytseg(image, tmp_path / "ours", *flags, "-sp", str(tmp_path / "ours.npz"), ml=True)
    assert_same_multilabel(ours, theirs)
    with np.load(tmp_path / "ours.npz") as a, np.load(tmp_path / "theirs.npz") as b:
        assert list(a) == list(b) == ["probabilities"]
        assert a["probabilities"].dtype == b["probabilities"].dtype == np.float32
        np.testing.assert_array_equal(a["probabilities"], b["probabilities"])
    mine, reference = (pickle.loads((tmp_path / f"{who}.pkl").read_bytes()) for who in ("ours", "theirs"))
    assert list(mine) == list(reference)
    for key in ("original_affine", "reoriented_affine"):
        np.testing.assert_allclose(mine["nibabel_stuff"][key], reference["nibabel_stuff"][key], atol=1e-5)
    rest = {k: v for k, v in reference.items() if k != "nibabel_stuff"}
    assert {k: v for k, v in mine.items() if k != "nibabel_stuff"} == rest
