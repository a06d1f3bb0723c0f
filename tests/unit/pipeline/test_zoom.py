"""The torch resampler gives scipy.ndimage.zoom's voxels exactly (the GPU path relies on it)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from raytseg.pipeline import zoom
from raytseg.pipeline.postprocess import to_input_grid
from raytseg.pipeline.preprocess import Resampling, _resampled
from raytseg.pipeline.records import InverseRecord

# TotalSegmentator's resamplings: 0.78 mm in-plane to 1.5 / 3 / 6 mm, thick slices up,
# an axis left alone, a single-voxel axis.
ZOOMS = [
    ((41, 37, 29), (0.78 / 1.5, 0.78 / 1.5, 1.0)),
    ((47, 45, 31), (0.78 / 3.0, 0.8 / 3.0, 2.5 / 3.0)),
    ((52, 40, 23), (0.7 / 6.0, 0.7 / 6.0, 5.0 / 6.0)),
    ((20, 31, 9), (1.7, 0.6, 5.0 / 1.5)),
    ((1, 5, 7), (2.0, 1.0, 0.5)),
]


def ct_like(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Integer HU with flat regions: where scipy's sum lands a rounding error off an integer."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1024, 3000, size=shape).astype(np.float64)
    data[: shape[0] // 2] = 7.0
    data[:, : shape[1] // 3] = -3.0
    return data


@pytest.mark.parametrize(("shape", "factors"), ZOOMS)
def test_linear_zoom_equals_scipy_bit_for_bit(shape: tuple[int, ...], factors: tuple[float, ...]) -> None:
    data = ct_like(shape, seed=len(shape) + shape[0])
    reference = ndimage.zoom(data, factors, order=1, mode="nearest")
    ours = zoom.zoom(torch.from_numpy(data), zoom.output_shape(shape, factors), order=1).numpy()
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)  # exact, not within a tolerance


def test_linear_zoom_keeps_scipys_truncation_hazard() -> None:
    """Flat regions give sums a rounding error off the integer; int32 truncation then differs
    from rounding. Equality must hold on those voxels too, or 1 HU would change."""
    data = ct_like((30, 30, 30), seed=3)
    factors = (0.77, 0.51, 1.3)
    reference = ndimage.zoom(data, factors, order=1, mode="nearest")
    hazardous = reference.astype(np.int32) != np.round(reference)
    assert hazardous.sum() > 100  # the case is really exercised
    ours = zoom.zoom(torch.from_numpy(data), reference.shape, order=1).numpy()
    np.testing.assert_array_equal(ours.astype(np.int32), reference.astype(np.int32))


@pytest.mark.parametrize(("shape", "factors"), ZOOMS)
def test_nearest_zoom_equals_scipy(shape: tuple[int, ...], factors: tuple[float, ...]) -> None:
    labels = np.random.default_rng(shape[1]).integers(0, 118, size=shape).astype(np.uint8)
    inverse = tuple(1 / f for f in factors)
    for f in (factors, inverse):
        reference = ndimage.zoom(labels, f, order=0, mode="nearest")
        ours = zoom.zoom(torch.from_numpy(labels), zoom.output_shape(shape, f), order=0).numpy()
        np.testing.assert_array_equal(ours, reference)


def test_zoom_refuses_what_it_does_not_replicate() -> None:
    with pytest.raises(ValueError, match="float64"):
        zoom.zoom(torch.zeros((4, 4, 4), dtype=torch.float32), (2, 2, 2), order=1)
    with pytest.raises(ValueError, match="order 0 and 1"):
        zoom.zoom(torch.zeros((4, 4, 4), dtype=torch.float64), (2, 2, 2), order=3)
    with pytest.raises(ValueError, match="3D"):
        zoom.zoom(torch.zeros((4, 4), dtype=torch.float64), (2, 2), order=0)


def test_stage_resampling_on_a_device_matches_the_scipy_path() -> None:
    """preprocess/postprocess give the same arrays with ``device`` as without it."""
    affine = np.diag([0.78, 0.78, 1.5, 1.0])
    data = ct_like((45, 38, 21), seed=5).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    on_cpu, resampled = _resampled(img, (1.5, 1.5, 1.5), Resampling())
    on_device, _ = _resampled(img, (1.5, 1.5, 1.5), Resampling(device=torch.device("cpu")))
    assert resampled
    np.testing.assert_array_equal(np.asanyarray(on_device.dataobj), np.asanyarray(on_cpu.dataobj))
    np.testing.assert_array_equal(on_device.affine, on_cpu.affine)
    labels = (np.asanyarray(on_cpu.dataobj) % 118).astype(np.uint8)
    inverse = InverseRecord(
        original_shape=img.shape,
        original_affine=affine,
        original_header=img.header,
        crop_box=None,
        canonical_shape=img.shape,
        canonical_affine=affine,
        model_shape=labels.shape,
        model_affine=on_cpu.affine,
        model_zooms=(1.5, 1.5, 1.5),
        resampled=True,
        split=None,
    )
    back_cpu = to_input_grid(labels, inverse)
    back_device = to_input_grid(labels, inverse, torch.device("cpu"))
    assert back_cpu.shape == img.shape
    np.testing.assert_array_equal(np.asanyarray(back_device.dataobj), np.asanyarray(back_cpu.dataobj))
