"""Task body's derived masks: body.nii.gz and skin.nii.gz, as TotalSegmentator derives them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import InvalidOptionError
from raytseg.pipeline.derived import derived_body_masks
from raytseg.pipeline.export import output_files, write_segmentation
from raytseg.pipeline.records import OutputOptions, Segmentation, Volume
from raytseg.tasks import get_task


@pytest.fixture(scope="module")
def ct(reference_data: Path) -> nib.Nifti1Image:
    return nib.load(reference_data / "example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def body_case(ct: nib.Nifti1Image) -> tuple[Segmentation, Volume]:
    from scipy.ndimage import binary_fill_holes

    data = np.asarray(ct.dataobj)
    body = binary_fill_holes(data > -400)
    labels = np.zeros(data.shape, dtype=np.uint8)
    labels[body] = 1
    labels[:, :, :8][body[:, :, :8]] = 2
    header = ct.header.copy()
    header.set_data_dtype(np.uint8)
    seg = Segmentation(labels, ct.affine, header, dict(get_task("body").classes), "body")
    return seg, Volume(data, ct.affine, ct.header)


def test_derived_body_masks(body_case: tuple[Segmentation, Volume]) -> None:
    seg, volume = body_case
    files = derived_body_masks(seg, volume)
    body, skin = files["body.nii.gz"], files["skin.nii.gz"]
    np.testing.assert_array_equal(np.asarray(body.dataobj), seg.labels > 0)
    skin_data = np.asarray(skin.dataobj)
    assert skin.get_data_dtype() == np.uint8
    assert skin_data.any()
    assert np.all(volume.data[skin_data > 0] > -200)


def test_derived_body_masks_need_both_classes(body_case: tuple[Segmentation, Volume]) -> None:
    seg, volume = body_case
    partial = Segmentation(seg.labels, seg.affine, seg.header, {1: "body_trunc"}, "body")
    with pytest.raises(InvalidOptionError, match="body_extremities"):
        derived_body_masks(partial, volume)


@pytest.mark.reference
def test_derived_body_masks_equal_totalsegmentator(
    tmp_path: Path, ts_python: Path, reference_data: Path, body_case: tuple[Segmentation, Volume]
) -> None:
    seg, volume = body_case
    ct_path = reference_data / "example_ct_sm.nii.gz"
    write_segmentation(seg, volume, str(tmp_path / "seg"), OutputOptions(derived_masks=False))
    done = subprocess.run(
        [
            str(ts_python),
            "-c",
            "from pathlib import Path\n"
            "import nibabel as nib\n"
            "from totalsegmentator.libs import combine_masks\n"
            "from totalsegmentator.postprocessing import extract_skin\n"
            "out = Path('seg')\n"
            "nib.save(combine_masks(out, 'body'), 'body.nii.gz')\n"
            f"skin = extract_skin(nib.load({str(ct_path)!r}), nib.load('body.nii.gz'))\n"
            "nib.save(skin, 'skin.nii.gz')\n",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours = dict(output_files(seg, volume, OutputOptions()))
    assert ours["body.nii.gz"] == (tmp_path / "body.nii.gz").read_bytes()
    assert ours["skin.nii.gz"] == (tmp_path / "skin.nii.gz").read_bytes()
