"""Fixtures of the pipeline tests: small NIfTI images and a private in-memory filesystem."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import nibabel as nib
import numpy as np
import pytest

MakeImage = Callable[..., nib.Nifti1Image]


def _image(
    shape: tuple[int, ...] = (4, 5, 6), dtype: Any = np.int16, zooms: tuple[float, ...] = (1.0, 2.0, 3.0)
) -> nib.Nifti1Image:
    data = np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)
    affine = np.diag([*zooms[:3], 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    return nib.Nifti1Image(data, affine)


@pytest.fixture
def make_image() -> MakeImage:
    """``make_image(shape, dtype, zooms)``: a NIfTI image of counting voxels, with an offset origin."""
    return _image


@pytest.fixture
def memfs() -> Iterator[tuple[Any, str]]:
    """fsspec's memory filesystem with a private root, removed afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/raytseg-load-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)
