"""``scipy.ndimage.zoom`` (order 0 or 1, ``mode="nearest"``) in torch, on any device.

TotalSegmentator resamples the input with ``ndimage.zoom(order=1)`` and the labels back
with ``order=0``, on one CPU core: on a GPU machine these two calls cost more than the
networks of ``--fast``. This module computes the same function with torch, so it can run
on the model's device, and it is bit-identical to scipy, not merely close: the resampled
CT is truncated to int32, and a value a rounding error below an integer would lose 1 HU.

It replays scipy's arithmetic (``NI_ZoomShift`` in ``ni_interpolation.c``) operation for
operation, in float64:

- output index ``k`` maps to input coordinate ``c = k * (n_in - 1) / (n_out - 1)``, which
  may exceed ``n_in - 1`` by a rounding error;
- order 1: taps ``floor(c)`` and ``floor(c) + 1`` (clamped to the last voxel,
  ``mode="nearest"``), weights ``w0 = 1 - (c - floor(c))``, ``w1 = 1 - w0``; the value is
  the sum over the 8 corners, the last axis varying fastest, of ``((v * wx) * wy) * wz``;
- order 0: the value at ``floor(c + 0.5)``.

Each torch elementwise operation rounds once, as the C code does (no fused multiply-add),
so every voxel matches; ``tests/unit/pipeline/test_zoom.py`` checks that against scipy.

``resample`` is the stages' one entry: scipy on the CPU, this module on a device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def resample(
    data: np.ndarray,
    factors: Sequence[float],
    order: int,
    device: torch.device | None,
    dtype: type | None = None,
) -> np.ndarray:
    """``ndimage.zoom(data, factors, order=order, mode="nearest")``, cast to ``dtype`` if given.

    Orders 1-5 compute in float64 (TotalSegmentator's ``get_fdata`` copy); order 0 copies
    values, so it runs on ``data``'s own dtype (uint8 labels: an eighth of float64's
    memory, same result). ``device`` None: scipy on the CPU; otherwise torch on that
    device, for orders 0 and 1 (higher spline orders run on scipy).
    """
    source = data.astype(np.float64, copy=False) if order >= 1 else data
    if device is None or order > 1:
        from scipy import ndimage

        out: np.ndarray = ndimage.zoom(source, factors, order=order, mode="nearest")
        return out if dtype is None else out.astype(dtype)
    import torch

    shape = output_shape(data.shape, list(factors))
    result = zoom(torch.from_numpy(np.ascontiguousarray(source)).to(device), shape, order)
    if dtype is not None:  # cast on the device: an int32 copy crosses to the host, not float64
        result = result.to(getattr(torch, np.dtype(dtype).name))
    return result.cpu().numpy()


def output_shape(shape: Sequence[int], zoom: Sequence[float]) -> tuple[int, ...]:
    """The shape ``ndimage.zoom`` gives ``shape`` for these zoom factors."""
    return tuple(int(round(n * z)) for n, z in zip(shape, zoom, strict=True))


def zoom(data: torch.Tensor, shape: Sequence[int], order: int) -> torch.Tensor:
    """``ndimage.zoom(data, ..., order=order, mode="nearest")`` resampled to ``shape``.

    ``data`` is 3D; order 1 needs float64 (scipy computes in float64), order 0 takes any
    dtype and only copies values. The result is on ``data``'s device.
    """
    if data.ndim != 3 or len(shape) != 3:
        raise ValueError(f"zoom resamples 3D arrays, got {tuple(data.shape)} -> {tuple(shape)}")
    if order == 0:
        return _nearest(data, shape)
    if order == 1:
        return _linear(data, shape)
    raise ValueError(f"zoom supports order 0 and 1, not {order}")


def _coordinates(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Input coordinate of each output index, as scipy computes it (float64)."""
    import torch

    factor = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
    # Not clamped: scipy keeps a coordinate a rounding error past the last voxel, so its
    # first tap stays there with a weight a rounding error below 1.
    return torch.arange(n_out, dtype=torch.float64, device=device) * factor


def _nearest(data: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    import torch

    out = data
    for axis, n_out in enumerate(shape):
        coords = _coordinates(data.shape[axis], n_out, data.device)
        index = torch.clamp(torch.floor(coords + 0.5).to(torch.int64), max=data.shape[axis] - 1)
        out = out.index_select(axis, index)
    return out


Taps = tuple[list["torch.Tensor"], list["torch.Tensor"]]


def _axis_weights(n_in: int, n_out: int, device: torch.device) -> Taps:
    """Per axis: the two input indices and the two weights of every output index."""
    import torch

    coords = _coordinates(n_in, n_out, device)
    start = torch.floor(coords)
    w0 = 1.0 - (coords - start)
    w1 = 1.0 - w0
    lo = torch.clamp(start.to(torch.int64), max=n_in - 1)
    hi = torch.clamp(lo + 1, max=n_in - 1)  # mode="nearest" past the last voxel
    return [lo, hi], [w0, w1]


def _linear(data: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    import torch

    if data.dtype != torch.float64:
        raise ValueError("order-1 zoom computes in float64, as scipy does; convert the input first")
    taps = [_axis_weights(data.shape[axis], n, data.device) for axis, n in enumerate(shape)]
    views = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
    out = torch.zeros(tuple(shape), dtype=torch.float64, device=data.device)
    for corner in itertools.product((0, 1), repeat=3):  # last axis fastest, as scipy's filter loop
        value = data
        for axis, tap in enumerate(corner):
            value = value.index_select(axis, taps[axis][0][tap])
        for axis, tap in enumerate(corner):
            value = value * taps[axis][1][tap].view(views[axis])
        out += value
    return out
