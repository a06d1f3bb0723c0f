"""TotalSegmentator's label table: the XML in a multilabel NIfTI's header that names its ids.

Written by the exporter, read back by ``raytseg stats``, ``combine-masks`` and anyone
holding a multilabel file; a record (``Segmentation.to_nifti``) adds it too. It imports
no other stage, so every one of them may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from xml.etree import ElementTree

import nibabel as nib

from raytseg.errors import InvalidImageError, UnreadableImageError

# ported from TotalSegmentator nifti_ext_header.py (add_label_map_to_nifti)
_LABEL_COLORS = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (255, 0, 128), (128, 255, 128), (0, 128, 255), (128, 128, 128), (185, 170, 155),
)  # fmt: skip
_XML_PRE = (
    '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA[2013-07-14T05:45:09]]></Date>'
    '   <VolumeInformation Index="0">   <LabelTable>'
)
_XML_POST = (
    "  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  <VolumeType><![CDATA[Label]]>"
    "</VolumeType>   </VolumeInformation></CaretExtension>"
)
_LABEL_EXTENSION_CODE = 0  # NIfTI "ignore" code, as TotalSegmentator uses


def add_label_table(img: nib.Nifti1Image, label_map: Mapping[int, str]) -> nib.Nifti1Image:
    """A copy of ``img`` with TotalSegmentator's XML label table appended to its header.

    The extension bytes equal those of TotalSegmentator's ``add_label_map_to_nifti``
    (same colours, same whitespace), so viewers and ``load_multilabel_nifti`` read it.
    ``img`` itself is not changed.

    Example:
        >>> img = add_label_table(nib.Nifti1Image(labels, affine), {1: "spleen"})  # doctest: +SKIP
        >>> read_label_table(img)  # doctest: +SKIP
        {1: 'spleen'}
    """
    out = nib.Nifti1Image(img.dataobj, img.affine, img.header)  # copies the header and its extension list
    out.header.extensions.append(
        nib.nifti1.Nifti1Extension(_LABEL_EXTENSION_CODE, label_table_xml(label_map))
    )
    return out


def label_table_xml(label_map: Mapping[int, str]) -> bytes:
    """TotalSegmentator's CaretExtension XML for ``{label id: name}``."""
    body = ""
    for label_id, label_name in label_map.items():
        red, green, blue = _LABEL_COLORS[int(label_id) % len(_LABEL_COLORS)]
        body += (
            f'<Label Key="{label_id}" Red="{red / 255}" Green="{green / 255}" Blue="{blue / 255}" '
            f'Alpha="1"><![CDATA[{label_name}]]></Label>\n'
        )
    return (_XML_PRE + "\n" + body + "\n" + _XML_POST + "\n              ").encode("utf-8")


def read_label_table(img: nib.Nifti1Image) -> dict[int, str]:
    """``{label id: name}`` from the first XML label table in the header extensions.

    Raises:
        InvalidImageError: the image has no label table (not a multilabel output).
        UnreadableImageError: the label table is there but is not valid XML.
    """
    name = img.get_filename() or "the image"
    for ext in img.header.extensions:
        content = ext.get_content()
        if not isinstance(content, bytes) or b"<CaretExtension" not in content:
            continue
        try:
            if (
                b"<!DOCTYPE" in content or b"<!ENTITY" in content
            ):  # never in a label table; refuse entity tricks
                raise ValueError("DOCTYPE/ENTITY declarations are not allowed")
            root = ElementTree.fromstring(content)
            labels = {int(e.attrib["Key"]): e.text or "" for e in root.iter("Label")}
        except (ElementTree.ParseError, KeyError, ValueError) as exc:
            raise UnreadableImageError(
                f"The label table in the header of {name} is damaged ({exc}). "
                "Write the segmentation again with --ml, or use the folder of per-class masks."
            ) from exc
        return labels
    raise InvalidImageError(
        f"{name} has no label table in its header, so its label ids have no class names. "
        "Use a multilabel file written by raytseg or TotalSegmentator with --ml, "
        "or the folder of per-class masks."
    )
