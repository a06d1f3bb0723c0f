"""Export stage: a ``Segmentation`` becomes the files TotalSegmentator writes.

    Segmentation ──▶ multilabel_nifti_bytes  (seg.nii.gz with the XML label table)
                 ──▶ class_mask_files        (one binary <class>.nii.gz per class)
                 ──▶ derived_body_masks      (task body: body.nii.gz, skin.nii.gz)
    write_segmentation: all of the above plus statistics.json, to a path or fsspec URI.

Files are byte-for-byte what TotalSegmentator 2.18 writes through ``nib.save``:
nibabel's deterministic gzip (level 1, mtime 0, no file name), the input header with
data type uint8, and TotalSegmentator's label table in header extension code 0.
"""

from __future__ import annotations

import os
import posixpath
import struct
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from xml.etree import ElementTree

import nibabel as nib
import numpy as np

from raytseg import storage
from raytseg.errors import InvalidImageError, InvalidOptionError, UnreadableImageError
from raytseg.pipeline.records import Segmentation, Volume
from raytseg.pipeline.stats import label_counts_and_sums, statistics_json

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

# nibabel's DeterministicGzipFile at nibabel's default level 1: no name, mtime 0,
# XFL 4 (fastest), OS 255 (unknown).
_GZIP_LEVEL = 1
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
_MAX_THREADS = 4


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


def nifti_gz_bytes(img: nib.Nifti1Image) -> bytes:
    """``.nii.gz`` bytes identical to ``nib.save(img, "x.nii.gz")``."""
    return gzip_bytes(img.to_bytes())


def gzip_bytes(*parts: bytes | memoryview) -> bytes:
    """The concatenated ``parts`` as one gzip member, like nibabel's ``DeterministicGzipFile``."""
    deflate = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [_GZIP_HEADER]
    crc, size = 0, 0
    for part in parts:
        chunks.append(deflate.compress(part))
        crc = zlib.crc32(part, crc)
        size += memoryview(part).nbytes
    chunks.append(deflate.flush())
    chunks.append(struct.pack("<II", crc, size & 0xFFFFFFFF))
    return b"".join(chunks)


def multilabel_nifti_bytes(seg: Segmentation) -> bytes:
    """The multilabel ``.nii.gz``: input header (uint8) plus the label table."""
    header = seg.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(np.asarray(seg.labels, dtype=np.uint8), seg.affine, header)
    return nifti_gz_bytes(add_label_table(img, seg.label_map))


def class_mask_files(seg: Segmentation) -> Iterator[tuple[str, bytes]]:
    """``(<class>.nii.gz, bytes)`` for every class of ``seg.label_map``, in its order.

    Each file is the binary uint8 mask ``labels == k`` with the input header and no
    label table, as TotalSegmentator writes without ``--ml``. Classes absent from the
    labels share one encoded all-zero file; the others are compressed on a few threads
    (zlib releases the GIL) while the caller consumes the previous ones.
    """
    encoder = _MaskEncoder(seg)
    todo = [k for k in seg.label_map if k in encoder.present]
    workers = max(1, min(_MAX_THREADS, _usable_cpus(), len(todo)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raytseg-export")
    try:
        encoded = pool.map(encoder.encode, todo)  # results arrive in ``todo`` order
        for k, name in seg.label_map.items():
            yield f"{name}.nii.gz", next(encoded) if k in encoder.present else encoder.empty()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _MaskEncoder:
    """Encodes the binary masks of one label map; header bytes and the empty file are made once."""

    def __init__(self, seg: Segmentation) -> None:
        header = seg.header.copy()
        header.set_data_dtype(np.uint8)
        self._labels_f = np.asfortranarray(seg.labels)  # NIfTI stores voxels in Fortran order
        # nibabel writes the header, then the voxels: the first bytes are the same for every mask
        probe = np.broadcast_to(np.zeros(1, dtype=np.uint8), self._labels_f.shape)
        raw = nib.Nifti1Image(probe, seg.affine, header).to_bytes()
        self.prefix = raw[: len(raw) - probe.size]
        n_bins = max(seg.label_map, default=0) + 1
        counts, _ = label_counts_and_sums(self._labels_f.T, None, n_bins)  # C-contiguous view
        self.present = {int(k) for k in np.flatnonzero(counts)}
        self._empty: bytes | None = None

    def encode(self, k: int) -> bytes:
        mask = self._labels_f == k  # Fortran-ordered, so .T is C-contiguous: no copy
        return gzip_bytes(self.prefix, mask.T.view(np.uint8).data.cast("B"))

    def empty(self) -> bytes:
        if self._empty is None:
            zeros = np.zeros(self._labels_f.size, dtype=np.uint8)
            self._empty = gzip_bytes(self.prefix, zeros.data)
        return self._empty


def write_segmentation(
    seg: Segmentation,
    output: str,
    *,
    ml: bool,
    extra_files: Mapping[str, bytes] | None = None,
) -> list[str]:
    """Write the segmentation where TotalSegmentator would, to a local path or fsspec URI.

    Args:
        seg: The segmentation; ``seg.statistics`` (if not None) becomes statistics.json.
        output: With ``ml=True`` the multilabel file (``seg.nii.gz``), and statistics.json
            goes next to it; otherwise a folder that receives ``<class>.nii.gz`` for
            every class and statistics.json.
        ml: One multilabel file instead of one file per class.
        extra_files: More ``{file name: bytes}`` for the same folder (body.nii.gz, skin.nii.gz).

    Returns:
        The locations written, in writing order. Each file is written atomically.

    Raises:
        StorageError: a write failed.
    """
    written: list[str] = []

    def put(location: str, data: bytes) -> None:
        storage.write_bytes(location, data)
        written.append(location)

    folder = _parent(output) if ml else output
    storage.make_dirs(folder)
    if ml:
        put(output, multilabel_nifti_bytes(seg))
    else:
        for name, data in class_mask_files(seg):
            put(storage.join(folder, name), data)
    for name, data in (extra_files or {}).items():
        put(storage.join(folder, name), data)
    if seg.statistics is not None:
        put(storage.join(folder, "statistics.json"), statistics_json(seg.statistics))
    return written


def _parent(location: str) -> str:
    """The folder holding ``location`` (a path or URI)."""
    if storage.is_uri(location):
        scheme, path = location.split("://", 1)
        return f"{scheme}://{posixpath.dirname(path.rstrip('/'))}"
    return str(storage.local_path(location).parent)


def derived_body_masks(seg: Segmentation, image: Volume) -> dict[str, bytes]:
    """body.nii.gz and skin.nii.gz, which TotalSegmentator adds to task ``body`` outputs.

    body is the union of body_trunc and body_extremities, saved as TotalSegmentator's
    ``combine_masks`` saves it (fresh header, the affine as read back from a class file);
    skin is TotalSegmentator's ``extract_skin`` on the input image.

    Raises:
        InvalidOptionError: ``seg`` lacks body_trunc or body_extremities (e.g. roi_subset).
    """
    ids = {name: k for k, name in seg.label_map.items()}
    missing = [n for n in ("body_trunc", "body_extremities") if n not in ids]
    if missing:
        raise InvalidOptionError(
            f"body.nii.gz and skin.nii.gz need the classes {', '.join(missing)}: "
            "segment the whole body task (no roi_subset), or skip the derived masks."
        )
    body = np.isin(seg.labels, [ids["body_trunc"], ids["body_extremities"]]).astype(np.uint8)
    body_img = nib.Nifti1Image(body, _affine_as_saved(seg))
    skin = extract_skin(image.data, body)
    skin_img = nib.Nifti1Image(skin.astype(np.uint8), image.affine)
    return {"body.nii.gz": nifti_gz_bytes(body_img), "skin.nii.gz": nifti_gz_bytes(skin_img)}


def _affine_as_saved(seg: Segmentation) -> np.ndarray:
    """The affine nibabel reads back from a saved class mask (float32 header fields)."""
    header = seg.header.copy()
    header.set_data_dtype(np.uint8)
    shaped_like_labels = np.broadcast_to(np.zeros(1, dtype=np.uint8), seg.labels.shape)  # no memory
    img = nib.Nifti1Image(shaped_like_labels, seg.affine, header)
    img.update_header()  # what nib.save does; the header fields are float32
    affine: np.ndarray = img.header.get_best_affine()
    return affine


def extract_skin(ct: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Skin voxels: the outer 3-4 voxel shell of ``body`` with CT density in (-200, 250).

    Ported from TotalSegmentator postprocessing.py ``extract_skin``; returns the mask
    that function wraps in a NIfTI image (int or bool 0/1 array).
    """
    from scipy.ndimage import binary_dilation, binary_erosion

    dilated = binary_dilation(body, iterations=1).astype(np.uint8)  # 1 voxel margin at the outside
    inner = binary_erosion(dilated, iterations=3).astype(np.uint8)
    skin = dilated - inner
    # TotalSegmentator compares get_fdata() floats; integer voxels compare the same
    density = (ct > -200) & (ct < 250)
    skin[~density] = 0
    from raytseg.pipeline.postprocess import remove_small_blobs

    mask: np.ndarray = (skin > 0).astype(np.uint8)
    remove_small_blobs(mask, [1], 5)  # TotalSegmentator: interval [5, 1e10]
    return mask
