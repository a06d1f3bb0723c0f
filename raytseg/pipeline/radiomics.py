"""TotalSegmentator's ``-r/--radiomics``: pyradiomics features of every class mask file.

As TotalSegmentator 2.18's ``statistics.get_radiomics_features_for_entire_dir``, per mask
file in name order (the key is the file name up to its first dot): pyradiomics resamples
image and mask to 3 mm (geometry tolerance 1e-3) and computes the ``shape`` and
``firstorder`` classes; values are rounded to 4 decimals. A mask without voxels, or one
pyradiomics fails on (e.g. too small after resampling), gets 0 for every feature of
pyradiomics' standard set, as TotalSegmentator does.

pyradiomics reads files, so the image and each mask go through a temporary folder: the
image with its stored values and geometry unchanged, the masks as the exact bytes of
the files the export writes. PyPI's pyradiomics 3.1.0 does not install on Python 3.11; the
``pyradiomics-bhklab`` build provides the same ``radiomics`` module (``raytseg[tools]``).
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from raytseg.errors import MissingResourceError

if TYPE_CHECKING:
    from raytseg.pipeline.records import Volume

log = logging.getLogger(__name__)
FILE_NAME = "statistics_radiomics.json"
# TotalSegmentator's extractor settings (statistics.py).
SETTINGS: dict[str, Any] = {
    "resampledPixelSpacing": [3, 3, 3],
    "geometryTolerance": 1e-3,
    "featureClass": ["shape"],
}
FEATURE_CLASSES = ("shape", "firstorder")
# The classes of pyradiomics' standard feature set, in the order of TotalSegmentator's list
# of zeroed features (each class's features in pyradiomics' order, deprecated ones left out).
_STANDARD_CLASSES = ("shape", "firstorder", "glcm", "gldm", "glrlm", "glszm", "ngtdm")

Features = dict[str, float]


def radiomics_json(image: Volume, masks: Iterable[tuple[str, bytes]]) -> bytes:
    """``statistics_radiomics.json`` for ``(file name, NIfTI bytes)`` masks of ``image``."""
    return json.dumps(radiomics_features(image, masks), indent=4).encode()


def radiomics_features(image: Volume, masks: Iterable[tuple[str, bytes]]) -> dict[str, Features]:
    """Features per mask, keyed by the file name up to its first dot, in file name order."""
    extractor = _extractor()
    with tempfile.TemporaryDirectory(prefix="raytseg-radiomics-") as tmp:
        folder = Path(tmp)
        image_path = _write_image(image, folder / "image.nii")
        features = {}
        for name, data in sorted(masks):
            mask_path = folder / name
            mask_path.write_bytes(data)
            features[name.split(".")[0]] = _mask_features(extractor, image_path, mask_path)
            mask_path.unlink()
        return features


def _mask_features(extractor: Any, image_path: Path, mask_path: Path) -> Features:
    try:
        if len(np.unique(nib.Nifti1Image.from_filename(mask_path).get_fdata())) <= 1:
            return dict.fromkeys(standard_features(), 0.0)
        values = extractor.execute(str(image_path), str(mask_path))
    except Exception as exc:  # TotalSegmentator's rule: any failure gives zeros
        log.warning("radiomics failed for %s (every feature set to 0): %s", mask_path.name, exc)
        return dict.fromkeys(standard_features(), 0.0)
    prefix = "original_"
    return {k.removeprefix(prefix): round(float(v), 4) for k, v in values.items() if k.startswith(prefix)}


def _write_image(image: Volume, path: Path) -> Path:
    """The image as pyradiomics would read the input file: stored values, same geometry."""
    header = image.header.copy()
    header.set_data_dtype(image.data.dtype)
    header.set_slope_inter(1.0, 0.0)  # the values are scaled already
    nib.save(nib.Nifti1Image(image.data, image.affine, header), path)
    return path


@functools.cache
def standard_features() -> tuple[str, ...]:
    """pyradiomics' standard features, as TotalSegmentator lists them."""
    classes = _radiomics().getFeatureClasses()
    return tuple(
        f"{name}_{feature}"
        for name in _STANDARD_CLASSES
        for feature, deprecated in classes[name].getFeatureNames().items()
        if not deprecated
    )


def _extractor() -> Any:
    featureextractor = _radiomics().featureextractor
    extractor = featureextractor.RadiomicsFeatureExtractor(**SETTINGS)
    extractor.disableAllFeatures()
    for name in FEATURE_CLASSES:
        extractor.enableFeatureClassByName(name)
    return extractor


def _radiomics() -> Any:
    try:
        import radiomics
        from radiomics import featureextractor  # noqa: F401 - loads the submodule
    except ImportError as exc:
        raise MissingResourceError(
            "--radiomics needs pyradiomics: pip install 'raytseg[tools]' (pyradiomics-bhklab)."
        ) from exc
    return radiomics
