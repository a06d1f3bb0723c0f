"""Decide which model passes a request needs, as TotalSegmentator's ``python_api`` does.

A request runs its passes over the image in the order ``passes()`` gives:

1. *crop passes* when the task works in a region (``lung_vessels`` in the lungs) or the
   user asked for ``--roi_subset`` or ``--body_seg``: a small, coarse model (6 mm
   ``total``, 3 mm with ``--robust_crop``, 6 mm ``body``) finds the region (``teeth``
   needs two: its crop task is itself cropped);
2. the *main pass*: the task's models on the image cropped to that region.

``admit`` is the one gate before a run, for every entry point: the MR rule, planning
(task, mode and class checks) and the license. Planning is pure: it reads the catalogue
and the options, never the image or the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from raytseg.errors import InvalidOptionError, RaytsegError, UnknownClassError
from raytseg.pipeline.records import SegmentOptions, Spacing
from raytseg.tasks import ModelSpec, TaskSpec, get_task

if TYPE_CHECKING:
    from raytseg.config import Settings

# TotalSegmentator overrides each task's crop margin with 20 mm whenever the default
# crop models find the region (python_api.py: ``crop_addon = [20,20,20] if crop_model is None``).
DEFAULT_CROP_MARGIN_MM: Spacing = (20.0, 20.0, 20.0)
BODY_ROIS = ("body_trunc", "body_extremities")
# task=auto (raytseg's own): the task for each modality, chosen once the image is read
# (pipeline.modality.choose_task).
AUTO_TASK = "auto"
TASK_FOR_MODALITY = {"CT": "total", "MR": "total_mr"}
# TotalSegmentator's -ms small (python_api.get_task_config): other plans, same folds.
SMALL_MODEL_TASK, SMALL_PLANS = "total_v3", "nnUNetResEncUNetLPlans_8"


@dataclass(frozen=True)
class Refinement:
    """A task whose labels another model's mask sharpens (TotalSegmentator 2.18's python_api)."""

    rules_of: str  # the task whose model-grid rules its labels get
    by_task: str  # the refining model's task and dataset, run on the whole image first
    by_dataset: int
    inside: tuple[str, ...]  # the refining model's classes the labels are kept inside ...
    dilation_mm: float  # ... after dilating each label by this much (into background only)


# vertebrae_pp_refined: the vertebrae_pp model and its relabelling, then its labels dilated
# by 2 mm and clipped to the vertebrae_body model's (305) vertebral bodies.
REFINEMENTS = {
    "vertebrae_pp_refined": Refinement("vertebrae_pp", "vertebrae_body", 305, ("vertebrae_body",), 2.0)
}


@dataclass(frozen=True)
class ModelRun:
    """One pass of one or more models over the image."""

    task: str  # whose class map and postprocessing apply
    models: tuple[ModelSpec, ...]
    resample_mm: Spacing | None
    step_size: float
    classes: dict[int, str]  # the task's full class map (part labels map into it)
    force_split: bool = False
    binarize: bool = False  # --body_seg keeps only foreground/background
    cropped_logits: bool = False  # -ho: nnU-Net resamples; logits go back class box by class box
    probabilities: bool = False  # -sp: the last model's softmax output (first chunk) is kept
    rules_of: str | None = None  # whose model-grid rules apply, when not the task's own

    @property
    def multi_model(self) -> bool:
        return len(self.models) > 1

    @property
    def rules(self) -> str:
        """The task whose model-grid postprocessing the labels get."""
        return self.rules_of or self.task


@dataclass(frozen=True)
class CropPass:
    """Find a region with ``plan``; then crop the main pass to its bounding box grown by
    ``then`` (a margin in mm), or, for a ``Refinement``, keep the main pass's labels,
    dilated, inside the region (no crop)."""

    plan: RunPlan
    rois: tuple[str, ...] | None  # class names of the region; None: all foreground
    then: Spacing | Refinement
    remove_outside: tuple[tuple[str, ...], float] | None = None  # (rois, dilation mm)


@dataclass(frozen=True)
class Renumbering:
    """``-v1o``: the output's labels numbered as TotalSegmentator 1 numbered its classes."""

    ids: dict[int, int]  # the task's id -> its v1 id (classes v1 lacks are not here: they become 0)
    classes: dict[int, str]  # the output's classes in v1 numbering (roi_subset applied)


@dataclass(frozen=True)
class RunPlan:
    """Everything the pipeline will run for one request, decided before any pixel is read."""

    main: ModelRun
    crop: CropPass | None
    output_classes: dict[int, str]  # classes reported (roi_subset applied)
    roi_ids: tuple[int, ...] | None
    fast_statistics: bool  # statistics on the model grid, as TotalSegmentator does with --fast
    renumbering: Renumbering | None = None  # -v1o, applied last (statistics keep the task's names)

    @property
    def all_models(self) -> tuple[ModelSpec, ...]:
        inner = self.crop.plan.all_models if self.crop else ()
        return inner + self.main.models


@dataclass(frozen=True)
class Pass:
    """One pass of a request, in run order."""

    plan: RunPlan  # the models and label rules of this pass
    options: SegmentOptions  # what its postprocessing applies: the request's for the main pass
    feeds: CropPass | None = None  # the next pass's crop, which reads this pass's labels

    @property
    def is_main(self) -> bool:
        return self.feeds is None


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check: its options (after the MR rule) and its passes."""

    options: SegmentOptions
    plan: RunPlan
    passes: tuple[Pass, ...]


def admit(options: SegmentOptions, settings: Settings, *, modality: str | None = None) -> Admitted:
    """Every check and decision before a run, the same for every entry point.

    ``modality`` is the image's DICOM Modality when known (None before loading, or for
    NIfTI): task ``total`` on an image tagged MR runs ``total_mr``, as ``TotalSegmentator``
    does for DICOM input. Task ``auto`` is admitted with the modality chosen for the image;
    before that, each of its ``candidates`` is.

    Raises:
        InputError subclasses: an unknown task or class, invalid options.
        LicenseError: the task needs a license key and none is set.
    """
    options = for_modality(options, modality)
    plan = plan_run(options)
    task = get_task(options.task)
    if task.license_required:
        from raytseg.weights.license import require_license

        require_license(task, settings)
    return Admitted(options, plan, passes(plan, options))


def candidates(options: SegmentOptions) -> tuple[SegmentOptions, ...]:
    """The requests ``options`` may run as: one per task that task ``auto`` may choose."""
    if options.task != AUTO_TASK:
        return (options,)
    return tuple(options.model_copy(update={"task": task}) for task in TASK_FOR_MODALITY.values())


def check_candidates(options: SegmentOptions, check: Callable[[SegmentOptions], object]) -> None:
    """``check`` (e.g. ``admit``) each request ``options`` may run as; for task auto, an error
    says which task it was found for."""
    for candidate in candidates(options):
        try:
            check(candidate)
        except RaytsegError as exc:
            if candidate.task == options.task:
                raise
            modality = next(m for m, task in TASK_FOR_MODALITY.items() if task == candidate.task)
            raise type(exc)(f"Task auto runs {candidate.task} on {modality} images: {exc.message}") from exc


def for_modality(options: SegmentOptions, modality: str | None) -> SegmentOptions:
    """The MR rule: task ``total`` on an image whose DICOM Modality is MR runs ``total_mr``;
    task ``auto`` runs the task of the modality chosen for the image."""
    if options.task == AUTO_TASK:
        if modality not in TASK_FOR_MODALITY:
            raise ValueError("task auto is admitted with the image's chosen modality, or as its candidates()")
        return options.model_copy(update={"task": TASK_FOR_MODALITY[modality]})
    if modality == "MR" and options.task == "total":
        return options.model_copy(update={"task": "total_mr"})
    return options


def passes(plan: RunPlan, options: SegmentOptions) -> tuple[Pass, ...]:
    """The passes of ``plan`` in the order they run: innermost crop pass first, main pass last."""
    chain: tuple[Pass, ...] = (Pass(plan, options),)
    while chain[0].plan.crop is not None:
        crop = chain[0].plan.crop
        # TotalSegmentator resamples for its crop models with the request's order, too.
        crop_options = SegmentOptions(task=crop.plan.main.task, resampling_order=options.resampling_order)
        chain = (Pass(crop.plan, crop_options, crop), *chain)
    return chain


def plan_run(options: SegmentOptions) -> RunPlan:
    """The passes ``options`` needs; raises ``InputError`` subclasses for bad requests."""
    task = get_task(options.task)
    _, mode = task.select_mode(fast=options.fast, fastest=options.fastest)
    rois = _validated_rois(task, options)
    models = tuple(mode.models)
    if options.model_size == "small":
        models = small_models(task, models)
    if rois is not None and len(models) > 1:
        models = tuple(m for m in models if set(m.labels.values()) & set(rois))
    main = ModelRun(
        task=task.name,
        models=models,
        resample_mm=None if options.higher_order_resampling else mode.resample_mm,
        step_size=task.step_size,
        classes=task.classes,
        force_split=options.force_split,
        # As TotalSegmentator: -sp turns -ho's cropped export off (it needs every class's
        # probabilities on the whole grid).
        cropped_logits=options.higher_order_resampling and not options.save_probabilities,
        probabilities=options.save_probabilities,
        rules_of=REFINEMENTS[task.name].rules_of if task.name in REFINEMENTS else None,
    )
    output = task.classes if rois is None else {k: v for k, v in task.classes.items() if v in rois}
    crop = _crop_pass(task, options, rois)
    if options.save_lowres:
        _check_lowres(options, crop)
    return RunPlan(
        main=main,
        crop=crop,
        output_classes=output,
        roi_ids=None if rois is None else tuple(output),
        fast_statistics=options.statistics and options.fast,
        renumbering=_v1_order(task, options, rois),
    )


def _check_lowres(options: SegmentOptions, crop: CropPass | None) -> None:
    """``-sl`` as TotalSegmentator allows it: a --fast or --fastest model, no crop pass (masks
    pasted into the input grid), statistics only where they are taken on the model grid."""
    if not (options.fast or options.fastest):
        raise InvalidOptionError(
            "save_lowres (-sl) works only with --fast or --fastest, as in TotalSegmentator: add one of them."
        )
    if options.higher_order_resampling:
        raise InvalidOptionError(
            "save_lowres (-sl) and higher_order_resampling (-ho) contradict: with -ho no model grid "
            "is made, nnU-Net answers on the input's grid. Leave out one of them (TotalSegmentator "
            "silently drops -sl)."
        )
    if crop is not None:
        raise InvalidOptionError(
            "save_lowres (-sl) cannot be combined with roi_subset, body_seg or a task that crops "
            f"first ({options.task} with these options does), as in TotalSegmentator."
        )
    if options.statistics and not options.fast:
        raise InvalidOptionError(
            "With --fastest, statistics are taken on the input grid, which -sl does not give: "
            "use --fast (statistics on its model grid) or leave out -sl."
        )


def _v1_order(task: TaskSpec, options: SegmentOptions, rois: tuple[str, ...] | None) -> Renumbering | None:
    """``-v1o``'s numbering; None for tasks without a v1 numbering (TotalSegmentator ignores it there)."""
    if not options.v1_order or task.v1_classes is None:
        return None
    current = {name: idx for idx, name in task.classes.items()}
    ids = {current[name]: v1 for v1, name in task.v1_classes.items() if name in current}
    classes = {v1: name for v1, name in task.v1_classes.items() if rois is None or name in rois}
    return Renumbering(ids, classes)


def small_models(task: TaskSpec, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
    """``-ms small``: TotalSegmentator's smaller plans, for the one task that has them."""
    if task.name != SMALL_MODEL_TASK:
        raise InvalidOptionError(
            f"model_size small exists only for task {SMALL_MODEL_TASK}, not {task.name}."
        )
    return tuple(m.model_copy(update={"plans": SMALL_PLANS}) for m in models)


def _validated_rois(task: TaskSpec, options: SegmentOptions) -> tuple[str, ...] | None:
    if options.roi_subset is None:
        return None
    if not task.name.startswith("total"):
        raise InvalidOptionError(
            f"--roi_subset works only with the total tasks (total, total_mr, total_v3), not {task.name!r}."
        )
    if not options.roi_subset:
        raise InvalidOptionError("--roi_subset needs at least one class name.")
    task.class_ids(list(options.roi_subset))
    return tuple(options.roi_subset)


def _is_mr(task: TaskSpec) -> bool:
    # TotalSegmentator decides crop models by the task's name suffix, not its modality.
    return task.name.endswith("_mr")


def _crop_pass(task: TaskSpec, options: SegmentOptions, rois: tuple[str, ...] | None) -> CropPass | None:
    if task.name in REFINEMENTS:
        return _refining_pass(REFINEMENTS[task.name], options)
    if task.crop is not None or rois is not None:
        return _region_crop(task, options, rois)
    if options.body_seg and not _is_mr(task):
        body = _pass_with_model("body", 300)
        body_run = replace(body.main, binarize=True)
        plan = RunPlan(body_run, None, body.output_classes, None, False)
        return CropPass(plan=plan, rois=None, then=task.body_crop_addon_mm)
    return None


def _refining_pass(refinement: Refinement, options: SegmentOptions) -> CropPass:
    """The refining model's pass, on the whole image at its own resolution, with -ho's
    cropped export when asked, as TotalSegmentator runs it."""
    if options.body_seg:
        raise InvalidOptionError(
            "body_seg (-bs) cannot be combined with a refined task: the refining model segments "
            "the whole image. Leave out -bs."
        )
    plan = _pass_with_model(refinement.by_task, refinement.by_dataset)
    plan = replace(plan, main=replace(plan.main, cropped_logits=options.higher_order_resampling))
    return CropPass(plan, refinement.inside, then=refinement)


def _region_crop(task: TaskSpec, options: SegmentOptions, rois: tuple[str, ...] | None) -> CropPass:
    crop_rois = tuple(task.crop.rois) if task.crop is not None else rois
    assert crop_rois is not None
    if task.crop is not None and task.crop.crop_task is not None:
        # Only ``teeth``: another task (with its own crop pass) finds the region.
        inner = plan_run(SegmentOptions(task=task.crop.crop_task))
        margin = task.crop.addon_mm
    else:
        inner = _default_crop_plan(task, options, crop_rois)
        margin = DEFAULT_CROP_MARGIN_MM
    _check_rois_known(inner, crop_rois)
    remove = None
    if task.remove_outside is not None:
        remove = (tuple(task.remove_outside.rois), task.remove_outside.dilation_mm)
        _check_rois_known(inner, remove[0])
    return CropPass(plan=inner, rois=crop_rois, then=margin, remove_outside=remove)


def _default_crop_plan(task: TaskSpec, options: SegmentOptions, rois: tuple[str, ...]) -> RunPlan:
    if any(r in BODY_ROIS for r in rois):
        return _pass_with_model("body", 300)
    robust = options.robust_crop or (task.crop is not None and task.crop.robust)
    if _is_mr(task):
        # MR always uses the 3 mm model: "6mm too bad results" (python_api.py).
        return _pass_with_model("total_mr", 852)
    return _pass_with_model("total", 297 if robust else 298)


def _pass_with_model(task_name: str, dataset_id: int) -> RunPlan:
    """A plain multilabel run of the mode of ``task_name`` that uses ``dataset_id``."""
    task = get_task(task_name)
    for mode in task.modes.values():
        if [m.dataset_id for m in mode.models] == [dataset_id]:
            run = ModelRun(task_name, tuple(mode.models), mode.resample_mm, task.step_size, task.classes)
            return RunPlan(run, None, task.classes, None, False)
    raise AssertionError(f"catalogue has no {task_name} mode with dataset {dataset_id}")


def _check_rois_known(plan: RunPlan, rois: tuple[str, ...]) -> None:
    known = set(plan.main.classes.values())
    unknown = [r for r in rois if r not in known]
    if unknown:
        raise UnknownClassError(
            f"The crop model ({plan.main.task}) has no class {', '.join(map(repr, unknown))}; "
            f"choose classes from: raytseg tasks --classes {plan.main.task}"
        )
