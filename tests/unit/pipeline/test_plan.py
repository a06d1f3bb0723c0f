"""Which model passes a request needs, as TotalSegmentator's python_api decides."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytseg.config import Settings
from raytseg.errors import InvalidOptionError, LicenseError, UnknownClassError, UnknownTaskError
from raytseg.pipeline.plan import REFINEMENTS, admit, candidates, check_candidates, passes, plan_run
from raytseg.pipeline.records import SegmentOptions


def ids(models: tuple) -> list[int]:  # type: ignore[type-arg]
    return [m.dataset_id for m in models]


def test_total_runs_five_parts_at_1_5_mm_with_step_0_8() -> None:
    plan = plan_run(SegmentOptions())
    assert ids(plan.main.models) == [291, 292, 293, 294, 295]
    assert plan.main.resample_mm == (1.5, 1.5, 1.5)
    assert plan.main.step_size == 0.8
    assert plan.crop is None
    assert len(plan.output_classes) == 117


@pytest.mark.parametrize(
    ("options", "dataset", "spacing"),
    [
        (SegmentOptions(fast=True), 297, 3.0),
        (SegmentOptions(fastest=True), 298, 6.0),
        (SegmentOptions(task="total_mr", fast=True), 852, 3.0),
        (SegmentOptions(task="body", fast=True), 300, 6.0),
        (SegmentOptions(task="body", fastest=True), 300, 6.0),  # falls back to fast, as TS
    ],
)
def test_resolution_modes(options: SegmentOptions, dataset: int, spacing: float) -> None:
    plan = plan_run(options)
    assert ids(plan.main.models) == [dataset]
    assert plan.main.resample_mm == (spacing,) * 3


def test_roi_subset_runs_only_needed_parts_after_a_6mm_crop_pass() -> None:
    plan = plan_run(SegmentOptions(roi_subset=("liver", "brain")))
    assert ids(plan.main.models) == [291, 294]
    assert plan.crop is not None
    assert ids(plan.crop.plan.main.models) == [298]
    assert plan.crop.then == (20.0, 20.0, 20.0)  # TotalSegmentator's override
    assert plan.output_classes == {5: "liver", 90: "brain"}


def test_robust_crop_and_mr_use_3mm_crop_models() -> None:
    assert ids(plan_run(SegmentOptions(roi_subset=("liver",), robust_crop=True)).crop.plan.main.models) == [
        297
    ]  # type: ignore[union-attr]
    assert ids(plan_run(SegmentOptions(task="total_mr", roi_subset=("liver",))).crop.plan.main.models) == [
        852
    ]  # type: ignore[union-attr]


def test_subtask_crop_uses_task_rois_and_step_0_5() -> None:
    plan = plan_run(SegmentOptions(task="lung_vessels"))
    assert plan.crop is not None
    assert plan.crop.rois is not None
    assert "lung_upper_lobe_left" in plan.crop.rois
    assert ids(plan.crop.plan.main.models) == [297]  # lung_vessels asks for the robust crop
    assert plan.main.step_size == 0.5


def test_body_crop_rois_use_the_body_model() -> None:
    plan = plan_run(SegmentOptions(task="abdominal_muscles"))
    assert plan.crop is not None
    assert ids(plan.crop.plan.main.models) == [300]


def test_body_seg_binarises_a_6mm_body_pass_with_the_task_margin() -> None:
    plan = plan_run(SegmentOptions(fast=True, body_seg=True))
    assert plan.crop is not None
    assert plan.crop.plan.main.binarize
    assert plan.crop.then == (3.0, 3.0, 3.0)
    assert plan_run(SegmentOptions(task="total_mr", body_seg=True)).crop is None  # ignored for MR


def test_teeth_nests_a_crop_pass_inside_its_crop_pass() -> None:
    plan = plan_run(SegmentOptions(task="teeth"))
    assert plan.crop is not None
    assert plan.crop.plan.main.task == "craniofacial_structures"
    assert plan.crop.plan.crop is not None
    assert plan.crop.then == (10.0, 10.0, 10.0)


def test_fast_statistics_only_with_fast() -> None:
    assert plan_run(SegmentOptions(fast=True, statistics=True)).fast_statistics
    assert not plan_run(SegmentOptions(fastest=True, statistics=True)).fast_statistics


@pytest.mark.parametrize(
    ("options", "error", "phrase"),
    [
        (SegmentOptions(task="nope"), UnknownTaskError, "Valid tasks"),
        (SegmentOptions(roi_subset=("livr",)), UnknownClassError, "raytseg tasks --classes total"),
        (SegmentOptions(task="lung_vessels", roi_subset=("liver",)), InvalidOptionError, "total tasks"),
        (SegmentOptions(task="cerebral_bleed", fast=True), InvalidOptionError, "without --fast"),
        (SegmentOptions(fast=True, fastest=True), InvalidOptionError, "not both"),
        (SegmentOptions(roi_subset=()), InvalidOptionError, "at least one"),
        (SegmentOptions(save_lowres=True), InvalidOptionError, "only with --fast or --fastest"),
        (SegmentOptions(save_lowres=True, fast=True, roi_subset=("liver",)), InvalidOptionError, "crops"),
        (SegmentOptions(save_lowres=True, fast=True, body_seg=True), InvalidOptionError, "crops first"),
        (SegmentOptions(save_lowres=True, fastest=True, statistics=True), InvalidOptionError, "use --fast"),
        (SegmentOptions(save_lowres=True, fast=True, higher_order_resampling=True), InvalidOptionError, "ho"),
    ],
)
def test_bad_requests_raise_typed_errors(options: SegmentOptions, error: type, phrase: str) -> None:
    with pytest.raises(error, match=phrase):
        plan_run(options)


def test_save_lowres_is_a_single_fast_pass() -> None:
    for options in (
        SegmentOptions(save_lowres=True, fast=True, statistics=True),  # statistics on the 3 mm grid
        SegmentOptions(save_lowres=True, fastest=True),
        SegmentOptions(task="total_mr", save_lowres=True, fast=True, body_seg=True),  # MR: no body pass
    ):
        assert plan_run(options).crop is None


def test_higher_order_resampling_leaves_only_the_main_pass_to_nnunet() -> None:
    plan = plan_run(SegmentOptions(roi_subset=("liver",), higher_order_resampling=True))
    assert plan.main.resample_mm is None  # nnU-Net resamples to its plans' spacing itself
    assert plan.crop is not None
    assert plan.crop.plan.main.resample_mm == (6.0, 6.0, 6.0)


# --- the pass sequence and the gate before a run ------------------------------------


def test_a_plain_request_is_one_main_pass_with_the_request_options() -> None:
    options = SegmentOptions(fast=True, statistics=True)
    (only,) = passes(plan_run(options), options)
    assert only.is_main
    assert only.feeds is None
    assert only.options == options


def test_teeth_runs_two_crop_passes_innermost_first() -> None:
    options = SegmentOptions(task="teeth", remove_small_blobs=50.0)
    plan = plan_run(options)
    steps = passes(plan, options)
    assert [step.plan.main.task for step in steps] == ["total", "craniofacial_structures", "teeth"]
    assert [ids(step.plan.main.models) for step in steps] == [[298], [115], [113]]
    # each crop pass feeds the crop of the pass after it, and runs with plain options
    for step, following in zip(steps, steps[1:], strict=False):
        assert step.feeds is following.plan.crop
        assert step.options == SegmentOptions(task=step.plan.main.task)
    assert steps[-1].plan is plan
    assert steps[-1].options == options


@pytest.mark.parametrize(
    ("task", "modality", "runs"),
    [
        ("total", "MR", "total_mr"),
        ("total", "CT", "total"),
        ("total", None, "total"),
        ("total_mr", "MR", "total_mr"),
        ("body", "MR", "body"),  # the rule is about total only, as TotalSegmentator's
    ],
)
def test_admit_applies_the_mr_rule(task: str, modality: str | None, runs: str, tmp_path: Path) -> None:
    admitted = admit(SegmentOptions(task=task, fast=True), _settings(tmp_path), modality=modality)
    assert admitted.options.task == runs
    assert admitted.plan.main.task == runs
    assert admitted.passes[-1].options == admitted.options


@pytest.mark.parametrize(("modality", "runs"), [("MR", "total_mr"), ("CT", "total")])
def test_task_auto_runs_the_task_of_the_chosen_modality(modality: str, runs: str, tmp_path: Path) -> None:
    options = SegmentOptions(task="auto", fast=True, roi_subset=("liver",))
    admitted = admit(options, _settings(tmp_path), modality=modality)
    assert admitted.options == options.model_copy(update={"task": runs})
    assert admitted.plan.main.task == runs


def test_task_auto_is_checked_as_each_task_it_may_run(tmp_path: Path) -> None:
    options = SegmentOptions(task="auto", fast=True)
    assert [c.task for c in candidates(options)] == ["total", "total_mr"]
    assert candidates(SegmentOptions(task="body")) == (SegmentOptions(task="body"),)
    with pytest.raises(ValueError, match="chosen modality"):
        admit(options, _settings(tmp_path))
    # total_mr has no kidney cysts: a subset naming one is refused, whatever the image is
    cysts = SegmentOptions(task="auto", roi_subset=("kidney_cyst_left",))
    admit(candidates(cysts)[0], _settings(tmp_path))
    with pytest.raises(UnknownClassError, match="^Task auto runs total_mr on MR images: .*kidney_cyst_left"):
        check_candidates(cysts, lambda options: admit(options, _settings(tmp_path)))
    with pytest.raises(UnknownClassError, match="^Task .total_mr. has no class"):  # as it is
        check_candidates(
            cysts.model_copy(update={"task": "total_mr"}), lambda o: admit(o, _settings(tmp_path))
        )


def test_vertebrae_pp_refined_runs_the_vertebrae_body_model_first() -> None:
    options = SegmentOptions(task="vertebrae_pp_refined")
    body, main = passes(plan_run(options), options)
    assert ids(body.plan.main.models) == [305]
    assert body.plan.main.resample_mm == (1.5, 1.5, 1.5)
    assert body.feeds is not None
    assert (body.feeds.rois, body.feeds.then) == (("vertebrae_body",), REFINEMENTS["vertebrae_pp_refined"])
    assert REFINEMENTS["vertebrae_pp_refined"].dilation_mm == 2.0
    assert ids(main.plan.main.models) == [803]
    assert (main.plan.main.task, main.plan.main.rules) == ("vertebrae_pp_refined", "vertebrae_pp")
    # -ho: the refining model's export is TotalSegmentator's cropped one too
    ho = SegmentOptions(task="vertebrae_pp_refined", higher_order_resampling=True)
    refining = plan_run(ho).crop
    assert refining is not None
    assert refining.plan.main.cropped_logits
    with pytest.raises(InvalidOptionError, match="-bs"):
        plan_run(SegmentOptions(task="vertebrae_pp_refined", body_seg=True))


def test_admit_refuses_a_licensed_task_without_a_license(tmp_path: Path) -> None:
    with pytest.raises(LicenseError, match="license"):
        admit(SegmentOptions(task="appendicular_bones"), _settings(tmp_path))


def test_admit_refuses_bad_options_before_the_license(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError):
        admit(SegmentOptions(task="body", roi_subset=("liver",)), _settings(tmp_path))


def _settings(home: Path) -> Settings:
    return Settings.from_env({"HOME": str(home), "TOTALSEG_HOME_DIR": str(home / "ts")})


def test_model_size_small_switches_total_v3_to_its_small_plans() -> None:
    big = plan_run(SegmentOptions(task="total_v3", fast=True)).main.models
    small = plan_run(SegmentOptions(task="total_v3", fast=True, model_size="small")).main.models
    assert [m.plans for m in small] == ["nnUNetResEncUNetLPlans_8"] * len(big)
    assert [m.model_copy(update={"plans": b.plans}) for m, b in zip(small, big, strict=True)] == list(big)
    with pytest.raises(InvalidOptionError, match="only for task total_v3"):
        plan_run(SegmentOptions(task="total", model_size="small"))
