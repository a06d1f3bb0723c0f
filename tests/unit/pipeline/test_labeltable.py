"""TotalSegmentator's label table, written and read back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raytseg.errors import InvalidImageError, UnreadableImageError
from raytseg.pipeline.labeltable import add_label_table, label_table_xml, read_label_table
from raytseg.tasks import get_task


def test_label_table_equals_reference_file_extension(reference_data: Path) -> None:
    img = nib.load(reference_data / "example_seg_fast.nii.gz")
    total = get_task("total").classes
    assert img.header.extensions[0].get_code() == 0
    assert img.header.extensions[0].get_content() == label_table_xml(total)
    assert read_label_table(img) == total
    assert list(read_label_table(img)) == list(total)


def test_add_label_table_round_trips_and_leaves_input_alone() -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    names = {3: "a & b", 1: "<odd>", 250: "ünïcode", 12: ""}
    out = add_label_table(img, names)
    assert len(img.header.extensions) == 0
    assert read_label_table(out) == names
    reloaded = nib.Nifti1Image.from_bytes(out.to_bytes())
    assert read_label_table(reloaded) == names


def test_read_label_table_without_table_says_what_to_do() -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    with pytest.raises(InvalidImageError, match="no label table"):
        read_label_table(img)


def test_read_label_table_damaged() -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, b"<CaretExtension><Label Key='x'>"))
    with pytest.raises(UnreadableImageError, match="damaged"):
        read_label_table(img)


def test_read_label_table_refuses_entity_declarations() -> None:
    xml = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><CaretExtension><Label Key="1">&a;</Label>'
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml + b"</CaretExtension>"))
    with pytest.raises(UnreadableImageError, match="DOCTYPE"):
        read_label_table(img)


@pytest.mark.reference
def test_label_table_bytes_equal_totalsegmentator(tmp_path: Path, ts_python: Path) -> None:
    maps = [
        {1: "liver"},
        {k: f"c{k}" for k in range(1, 30)},
        {5: "kidney_left", 2: "spleen", 117: "costal_cartilages", 13: "x y"},
        dict(get_task("body").classes),
    ]
    (tmp_path / "maps.json").write_text(json.dumps([list(m.items()) for m in maps]))
    done = subprocess.run(
        [
            str(ts_python),
            "-c",
            "import json, numpy as np, nibabel as nib\n"
            "from totalsegmentator.nifti_ext_header import add_label_map_to_nifti\n"
            "for i, items in enumerate(json.load(open('maps.json'))):\n"
            "    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))\n"
            "    img = add_label_map_to_nifti(img, {int(k): v for k, v in items})\n"
            "    open(f'ext{i}.xml', 'wb').write(img.header.extensions[0].get_content())\n",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for i, label_map in enumerate(maps):
        assert label_table_xml(label_map) == (tmp_path / f"ext{i}.xml").read_bytes()
