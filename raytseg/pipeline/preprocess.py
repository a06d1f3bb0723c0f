"""Preprocess stage: Volume -> normalised network inputs, as TotalSegmentator prepares them.

TotalSegmentator (``nnunet.py: nnUNet_predict_image``) crops the image to a region,
reorients it to RAS (``nib.as_closest_canonical``), resamples it with
``scipy.ndimage.zoom`` (order 1, ``mode="nearest"``, cast to int32, which truncates HU
towards zero), writes it to NIfTI and lets nnU-Net read, crop-to-nonzero and normalise it
per model. This module does the same in memory and calls nnU-Net's own
``DefaultPreprocessor.run_case_npy`` for the per-model part, so every model sees exactly
the array it would see under TotalSegmentator. Huge images and ``--force_split`` are
cut into TotalSegmentator's three overlapping z chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import nibabel as nib
import numpy as np

from raytseg.errors import WeightsIntegrityError
from raytseg.pipeline.axes import nifti_zooms, spacing_to_network, to_network
from raytseg.pipeline.plan import ModelRun
from raytseg.pipeline.records import (
    Box,
    CaseGeometry,
    ChunkSplit,
    InverseRecord,
    NetworkInput,
    Prepared,
    Shape3,
    Spacing,
    Volume,
)
from raytseg.pipeline.zoom import resample
from raytseg.tasks import ModelSpec

if TYPE_CHECKING:
    import torch

# nnunet.py: images above this many voxels (and > 200 slices) run as three z chunks
# when several models are applied.
SPLIT_VOXELS = 512 * 512 * 900
SPLIT_MIN_SLICES = 200


@dataclass(frozen=True)
class ModelPlans:
    """A model's plans.json and dataset.json, as read from its folder."""

    model_key: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]


def model_key(spec: ModelSpec) -> str:
    """Stable name of a model: ``<dataset id>/<trainer>__<plans>__<configuration>``."""
    return f"{spec.dataset_id}/{spec.trainer_folder}"


class PlansSource(Protocol):
    """Where plans.json and dataset.json come from (``WeightsStore`` is one)."""

    def read_plans(self, spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Any]]: ...


def read_model_plans(source: PlansSource, spec: ModelSpec) -> ModelPlans:
    plans, dataset_json = source.read_plans(spec)
    return ModelPlans(model_key(spec), spec.configuration, plans, dataset_json)


class PlansCache:
    """Each model's plans, read once per process: every pass prepares with them."""

    def __init__(self, source: PlansSource) -> None:
        self._source = source
        self._plans: dict[str, ModelPlans] = {}

    def __call__(self, spec: ModelSpec) -> ModelPlans:
        key = model_key(spec)
        if key not in self._plans:
            self._plans[key] = read_model_plans(self._source, spec)
        return self._plans[key]


@dataclass(frozen=True)
class Resampling:
    """How the image is resampled to the model's spacing.

    ``device``: where (a GPU beside the networks); None resamples with scipy on the CPU.
    Both give the same voxels (``raytseg.pipeline.zoom``). ``order``: the spline order
    (TotalSegmentator's ``--resampling_order``).
    """

    order: int = 1
    device: torch.device | None = None


def preprocess(
    volume: Volume,
    run: ModelRun,
    plans: Mapping[str, ModelPlans],
    *,
    crop_box: Box | None = None,
    keep_model_image: bool = False,
    resampling: Resampling = Resampling(),
) -> Prepared:
    """Crop, reorient, resample (``resampling``) and normalise ``volume`` for every model of ``run``."""
    cropped = _cropped_image(volume, crop_box)
    canonical = nib.as_closest_canonical(cropped)
    model_img, resampled = _resampled(canonical, run.resample_mm, resampling)
    model_data = np.asanyarray(model_img.dataobj)
    split = _split_for(model_data.shape, run)
    chunks = _chunks(model_data, split)
    spacing = spacing_to_network(nifti_zooms(model_img.affine))
    inputs = tuple(
        item
        for index, chunk in enumerate(chunks)
        for item in _network_inputs(chunk, index, spacing, run, plans)
    )
    inverse = InverseRecord(
        original_shape=volume.shape,
        original_affine=volume.affine,
        original_header=volume.header,
        crop_box=crop_box,
        canonical_shape=_shape3(canonical.shape),
        canonical_affine=canonical.affine,
        model_shape=_shape3(model_data.shape),
        model_affine=model_img.affine,
        model_zooms=nifti_zooms(model_img.affine),
        resampled=resampled,
        split=split,
    )
    return Prepared(inputs=inputs, inverse=inverse, model_image=model_data if keep_model_image else None)


def crop_box_from_mask(mask: np.ndarray, margin_mm: Spacing, affine: np.ndarray) -> Box:
    """Bounding box of ``mask`` grown by ``margin_mm`` and clipped to the image.

    Ported from TotalSegmentator ``cropping.py`` (``crop_to_mask``/``get_bbox_from_mask``):
    the margin becomes ``int(mm / voxel size)`` voxels per axis.
    """
    zooms = np.array(nifti_zooms(affine))
    addon = (np.array(margin_mm) / zooms).astype(int)
    coords = np.nonzero(mask > 0)
    box = []
    for axis in range(3):
        lo = int(np.min(coords[axis])) - int(addon[axis])
        hi = int(np.max(coords[axis])) + 1 + int(addon[axis])
        box.append((max(0, lo), min(mask.shape[axis], hi)))
    return (box[0], box[1], box[2])


def _shape3(shape: tuple[int, ...]) -> Shape3:
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _cropped_image(volume: Volume, box: Box | None) -> nib.Nifti1Image:
    """The image TotalSegmentator resamples: float values, cropped ones cast to int32.

    TotalSegmentator converts to float64 (``get_fdata``) and casts a cropped region to
    int32. The float64 copy is deferred to resampling, where it is needed; for unscaled
    integer data the values are the same.
    """
    if box is None:
        return nib.Nifti1Image(volume.data, volume.affine)
    (x0, x1), (y0, y1), (z0, z1) = box
    region = volume.data[x0:x1, y0:y1, z0:z1]
    if not np.issubdtype(region.dtype, np.integer):
        region = region.astype(np.float64)
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ np.array([x0, y0, z0, 1]))[:3]
    return nib.Nifti1Image(region.astype(np.int32), affine)


def _resampled(
    img: nib.Nifti1Image, target_mm: Spacing | None, how: Resampling
) -> tuple[nib.Nifti1Image, bool]:
    """TotalSegmentator's ``change_spacing(img, target, order=order, dtype=int32)``."""
    if target_mm is None:
        return img, False
    current = np.array(img.header.get_zooms()[:3])
    target = np.array(target_mm, dtype=np.float64)
    if np.array_equal(current, target):
        return img, False
    zoom = current / target
    data = np.asanyarray(img.dataobj)
    resampled = resample(data, zoom.tolist(), how.order, how.device, dtype=np.int32)
    affine = img.affine.copy()
    for axis in range(3):
        affine[:3, axis] = affine[:3, axis] / zoom[axis]
    return nib.Nifti1Image(resampled, affine), True


def _split_for(shape: tuple[int, ...], run: ModelRun) -> ChunkSplit | None:
    big = int(np.prod(shape)) > SPLIT_VOXELS and shape[2] > SPLIT_MIN_SLICES and run.multi_model
    return ChunkSplit(third=shape[2] // 3) if (big or run.force_split) else None


def _chunks(data: np.ndarray, split: ChunkSplit | None) -> list[np.ndarray]:
    if split is None:
        return [data]
    t, m = split.third, split.margin
    return [data[:, :, : t + m], data[:, :, t + 1 - m : 2 * t + m], data[:, :, 2 * t + 1 - m :]]


@dataclass(frozen=True)
class _NonzeroCrop:
    """nnU-Net's crop to the non-zero region, computed once per axis order."""

    shape_before: Shape3
    bbox: Box
    seg: np.ndarray  # 0 inside, -1 outside (nnU-Net's convention), used by z-score masks


def _network_inputs(
    chunk: np.ndarray, index: int, spacing: Spacing, run: ModelRun, plans: Mapping[str, ModelPlans]
) -> list[NetworkInput]:
    """nnU-Net's ``DefaultPreprocessor.run_case_npy`` for every model, sharing its crop.

    The steps are nnU-Net's own functions in nnU-Net's order (transpose, crop to non-zero,
    normalise, resample). Only the crop, which depends on the image alone, is computed once
    instead of once per model: a fifth of the work for ``total``'s five models.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    # nnU-Net's readers hand run_case_npy a C-contiguous float32 (1, z, y, x) array. The
    # memory layout matters: z-score normalisation sums in memory order.
    base = np.ascontiguousarray(to_network(chunk), dtype=np.float32)
    crops: dict[tuple[int, ...], _NonzeroCrop] = {}
    inputs = []
    for spec in run.models:
        model = plans[model_key(spec)]
        manager = PlansManager(model.plans)
        order = tuple(int(a) for a in manager.transpose_forward)
        if order not in crops:
            crops[order] = _nonzero_crop(_transposed(base, order))
        data, geometry = _normalised(base, order, crops[order], spacing, manager, model)
        # -sp keeps what TotalSegmentator's file ends up holding: each model overwrites it,
        # and of split chunks it copies the first's.
        keep = run.probabilities and index == 0 and spec == run.models[-1]
        options = {"cropped_logits": run.cropped_logits, "probabilities": keep}
        inputs.append(NetworkInput(model_key(spec), index, data, geometry, run.step_size, **options))
    return inputs


def _transposed(data: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    return data.transpose([0, *(a + 1 for a in order)])


def _nonzero_crop(data: np.ndarray) -> _NonzeroCrop:
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    _, seg, bbox = crop_to_nonzero(data)
    box = tuple((int(lo), int(hi)) for lo, hi in bbox)
    return _NonzeroCrop(_shape3(data.shape[1:]), box, seg)  # type: ignore[arg-type]


def _normalised(
    base: np.ndarray,
    order: tuple[int, ...],
    crop: _NonzeroCrop,
    spacing: Spacing,
    manager: Any,
    model: ModelPlans,
) -> tuple[np.ndarray, CaseGeometry]:
    """One model's normalised (and, if its plans say so, resampled) input."""
    config = manager.get_configuration(model.configuration)
    # A fresh copy per model, viewed exactly as run_case_npy views it (normalisation is in place).
    slicer = (slice(None), *(slice(lo, hi) for lo, hi in crop.bbox))
    data = _transposed(base.copy(), order)[slicer]
    spacing_t = [spacing[a] for a in order]
    target = list(config.spacing)
    for c, scheme in enumerate(config.normalization_schemes):
        normaliser = _normaliser_class(scheme)(
            use_mask_for_norm=config.use_mask_for_norm[c],
            intensityproperties=manager.foreground_intensity_properties_per_channel[str(c)],
        )
        data[c] = normaliser.run(data[c], crop.seg[0])
    shape_after = _shape3(data.shape[1:])
    new_shape = [int(round(i / j * k)) for i, j, k in zip(spacing_t, target, shape_after, strict=True)]
    if list(shape_after) != new_shape:  # nnU-Net resamples itself (tasks without TS resampling)
        data = config.resampling_fn_data(data, new_shape, spacing_t, target)
    geometry = CaseGeometry(
        spacing=spacing,
        shape_before_cropping=crop.shape_before,
        bbox_used_for_cropping=crop.bbox,
        shape_after_cropping_and_before_resampling=shape_after,
    )
    return np.ascontiguousarray(data, dtype=np.float32), geometry


def _normaliser_class(scheme: str) -> Any:
    """nnU-Net's lookup of a normalisation scheme by its plans name."""
    from os.path import join

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(
        join(nnunetv2.__path__[0], "preprocessing", "normalization"),
        scheme,
        "nnunetv2.preprocessing.normalization",
    )
    if found is None:
        raise WeightsIntegrityError(f"plans.json names an unknown normalisation scheme {scheme!r}.")
    return found
