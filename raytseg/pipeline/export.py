"""Export stage: a ``Segmentation`` becomes the files TotalSegmentator writes.

    Segmentation ──▶ output_files ──▶ segmentation.nii.gz (multilabel, with the XML label table)
                                       or <class>.nii.gz per class (+ body/skin for task body)
                                  ──▶ segmentation_seg.dcm, segmentation_rtstruct.dcm (DICOM input)
                                  ──▶ preview_<task>.png, statistics.json, statistics_radiomics.json
    write_segmentation: output_files to a folder (or the one file it names), path or fsspec URI;
                        a placed file (-s PATH) to its own path.

Files are byte-for-byte what TotalSegmentator 2.18 writes through ``nib.save``:
nibabel's deterministic gzip (level 1, mtime 0, no file name), the input header with
data type uint8, and TotalSegmentator's label table in header extension code 0.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from raytseg import storage
from raytseg.errors import InvalidOptionError
from raytseg.pipeline.labeltable import add_label_table
from raytseg.pipeline.records import (
    PROBABILITIES_NAME,
    PROPERTIES_NAME,
    STATISTICS_NAME,
    OutputOptions,
    Probabilities,
    Segmentation,
    SegmentOptions,
    Volume,
)
from raytseg.pipeline.stats import label_counts_and_sums, statistics_json

if TYPE_CHECKING:
    from raytseg.pipeline.dicomsource import DicomSource

# nibabel's DeterministicGzipFile at nibabel's default level 1: no name, mtime 0,
# XFL 4 (fastest), OS 255 (unknown).
_GZIP_LEVEL = 1
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
MULTILABEL_NAME = "segmentation.nii.gz"  # the multilabel file in an output folder, everywhere
# The DICOM outputs' names: TotalSegmentator's for several output types, base "segmentation".
DICOM_NAMES = {"dicom_seg": "segmentation_seg.dcm", "dicom_rtstruct": "segmentation_rtstruct.dcm"}


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


def class_mask_files(seg: Segmentation, threads: int = 6) -> Iterator[tuple[str, bytes]]:
    """``(<class>.nii.gz, bytes)`` for every class of ``seg.label_map``, in its order.

    Each file is the binary uint8 mask ``labels == k`` with the input header and no
    label table, as TotalSegmentator writes without ``--ml``. Classes absent from the
    labels share one encoded all-zero file; the others are compressed on up to ``threads``
    threads (TotalSegmentator's ``-ns``; zlib releases the GIL) while the caller consumes the
    previous ones.
    """
    encoder = _MaskEncoder(seg)
    todo = [k for k in seg.label_map if k in encoder.present]
    workers = max(1, min(threads, _usable_cpus(), len(todo)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raytseg-export")
    try:
        encoded = pool.map(encoder.encode, todo)  # results arrive in ``todo`` order
        for k, name in seg.label_map.items():
            yield f"{name}.nii.gz", next(encoded) if k in encoder.present else encoder.empty()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def label_mask_files(
    labels: np.ndarray, classes: dict[int, str], image: Volume
) -> Iterator[tuple[str, bytes]]:
    """``class_mask_files`` of a label map on ``image``'s grid (an existing segmentation)."""
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    yield from class_mask_files(Segmentation(labels, image.affine, header, classes, "existing"))


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


def check_output(output: OutputOptions, volume: Volume) -> None:
    """Refuse, before any model runs, outputs this input cannot give: DICOM outputs need a
    DICOM input whose slices are the image's voxel grid (``DicomOutputError``), and their
    codes need TotalSegmentator's mapping (``MissingResourceError``)."""
    if output.dicom and not output.skip_saving:
        from raytseg.pipeline.coding import class_codings
        from raytseg.pipeline.dicomgrid import slice_grid

        slice_grid(volume.series, volume.affine, volume.shape)
        class_codings()
        _check_installed({"dicom_seg": "highdicom", "dicom_rtstruct": "rt_utils"}, output)


def check_target(target: str | None, output: OutputOptions, statistics: bool) -> None:
    """Without an output location only a DICOMweb server receives outputs: refuse, before
    any work, the options whose files would have nowhere to go."""
    if target is not None:
        return
    if output.dicomweb_store is None:
        raise InvalidOptionError(
            "Give an output folder or file (-o), or a DICOMweb server (--dicomweb_store)."
        )
    if "nifti" in output.output_type or output.preview or statistics:
        raise InvalidOptionError(
            "Without -o only the DICOM outputs can be stored (on --dicomweb_store): give -o for NIfTI, "
            "the preview and statistics, or ask for -ot dicom_seg / dicom_rtstruct only."
        )


def check_model_grid(options: SegmentOptions, output: OutputOptions) -> None:
    """``-sl`` leaves the masks on the model's grid: refuse, before any work, the outputs that
    need them on the input's. TotalSegmentator refuses the DICOM outputs; its preview,
    radiomics and skin mask would mix the two grids."""
    if not options.save_lowres:
        return
    refused = {
        "DICOM outputs": output.dicom and not output.skip_saving,
        "the preview (-p)": output.preview,
        "radiomics (-r)": output.radiomics,
        "task body's body.nii.gz and skin.nii.gz (add -ndm)": _writes_body_masks(output, options.task),
    }
    if any(refused.values()):
        needing = ", ".join(name for name, asked in refused.items() if asked)
        raise InvalidOptionError(
            f"save_lowres (-sl) keeps the masks on the model's grid, and {needing} need them on "
            "the input's: leave out -sl, or these."
        )


def _check_installed(libraries: dict[str, str], output: OutputOptions) -> None:
    import importlib.util

    from raytseg.errors import MissingResourceError

    for kind in output.output_type:
        if kind in libraries and importlib.util.find_spec(libraries[kind]) is None:
            raise MissingResourceError(
                f"output_type {kind} needs the Python package {libraries[kind]}, which is not "
                "installed here: pip install 'raytseg[dicom]'."
            )


def output_files(seg: Segmentation, volume: Volume, output: OutputOptions) -> Iterator[tuple[str, bytes]]:
    """``(file name, bytes)`` of every file a segmentation produces, in writing order.

    The one list for every entry point (the CLI and Python API write it, the service
    zips it, jobs and batch items commit it), for each output type in the order asked:
    nifti, the multilabel ``MULTILABEL_NAME`` or one ``<class>.nii.gz`` per class, for task
    ``body`` per class also body.nii.gz and skin.nii.gz; dicom_seg and dicom_rtstruct,
    ``DICOM_NAMES`` (none of them with ``skip_saving``); then ``preview_<task>.png``,
    statistics.json and statistics_radiomics.json (of the NIfTI files written before).
    """
    if seg.probabilities is not None:  # TotalSegmentator writes them while predicting: first
        yield from _probability_files(seg.probabilities)
    masks: list[tuple[str, bytes]] = []  # the NIfTI files, for radiomics
    if not output.skip_saving:
        dicom = _DicomSources(seg, volume)
        for kind in output.output_type:
            for name, data in (
                _nifti_files(seg, volume, output) if kind == "nifti" else _dicom_file(dicom, output, kind)
            ):
                if output.radiomics and name.endswith(".nii.gz"):
                    masks.append((name, data))
                yield name, data
    if output.preview:
        yield f"preview_{seg.task}.png", _preview(seg, volume, output)
    if seg.statistics is not None:
        yield STATISTICS_NAME, statistics_json(seg.statistics)
    if output.radiomics:
        from raytseg.pipeline.radiomics import FILE_NAME, radiomics_json

        yield FILE_NAME, radiomics_json(volume, masks)


def _probability_files(probabilities: Probabilities) -> Iterator[tuple[str, bytes]]:
    """-sp's two files as nnU-Net writes them: ``np.savez_compressed`` and a pickle."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.values)
    yield PROBABILITIES_NAME, buffer.getvalue()
    yield PROPERTIES_NAME, pickle.dumps(probabilities.properties)


def _preview(seg: Segmentation, volume: Volume, output: OutputOptions) -> bytes:
    if output.preview_kind == "2d":
        from raytseg.pipeline.preview import preview_png

        return preview_png(seg, volume)
    from raytseg.pipeline.preview3d import preview3d_png

    return preview3d_png(seg, volume)


def reads_image(output: OutputOptions, task: str) -> bool:
    """Whether ``output_files`` reads the input image's voxels: the preview and radiomics
    do, and so does task ``body``'s skin mask."""
    return output.preview or output.radiomics or _writes_body_masks(output, task)


def _writes_body_masks(output: OutputOptions, task: str) -> bool:
    return output.derived_masks and not output.ml and not output.skip_saving and task == "body"


class _DicomSources:
    """The slices and frames every DICOM output of one segmentation shares, made once and
    only when a DICOM output is asked for."""

    def __init__(self, seg: Segmentation, volume: Volume) -> None:
        self.seg, self._volume = seg, volume

    @functools.cached_property
    def source(self) -> DicomSource:
        from raytseg.pipeline.dicomsource import dicom_source

        return dicom_source(self.seg, self._volume.series)


def _dicom_file(sources: _DicomSources, output: OutputOptions, kind: str) -> Iterator[tuple[str, bytes]]:
    if kind == "dicom_seg":
        from raytseg.pipeline.dicomseg import dicom_seg_bytes

        yield DICOM_NAMES[kind], dicom_seg_bytes(sources.seg, sources.source, output.dicom_seg_type)
    else:
        from raytseg.pipeline.rtstruct import rtstruct_bytes

        yield DICOM_NAMES[kind], rtstruct_bytes(sources.seg, sources.source)


def _nifti_files(seg: Segmentation, volume: Volume, output: OutputOptions) -> Iterator[tuple[str, bytes]]:
    if output.ml:
        yield MULTILABEL_NAME, multilabel_nifti_bytes(seg)
        return
    yield from class_mask_files(seg, output.nr_thr_saving)
    if _writes_body_masks(output, seg.task):
        from raytseg.pipeline.derived import derived_body_masks

        for name, img in derived_body_masks(seg, volume).items():
            yield name, nifti_gz_bytes(img)


def write_segmentation(
    seg: Segmentation,
    volume: Volume,
    target: str | None,
    output: OutputOptions,
    places: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``output_files`` to a local path or fsspec URI; returns the locations, in order.

    ``target`` is a folder, or it names the first output type's one file, as TotalSegmentator's
    ``-o``: ``seg.nii.gz`` with ``ml``, ``seg.dcm`` for ``dicom_seg`` or ``dicom_rtstruct``;
    the other files go beside it. ``places`` puts files elsewhere, ``{file name: location}``
    (``-s PATH``: statistics.json at PATH), with a target or without. Each file is written
    atomically; a failed write raises ``StorageError``. With ``output.dicomweb_store`` the
    DICOM files are then stored on that server too (their instance URIs end the list);
    ``target`` None writes only the placed files.
    """
    named = None if target is None else _named_file(output, target)
    folder = storage.parent(target) if named and target else target
    if folder is not None:
        storage.make_dirs(folder)
    written, dicom = [], []
    where = {**({named: target} if named and target else {}), **(places or {})}
    files = output if folder is not None else _without_folder(output)
    for name, data in output_files(seg, volume, files):
        if name in DICOM_NAMES.values():
            dicom.append(data)
        location = _location(name, where, folder)
        if location is None:
            continue
        if name.endswith(".nii.gz") and location.endswith(".nii"):  # uncompressed, as nib.save writes
            data = gzip.decompress(data)
        storage.write_bytes(location, data)
        written.append(location)
    if output.dicomweb_store is not None:
        from raytseg import dicomweb

        written += dicomweb.store(output.dicomweb_store, dicom)
    return written


def _location(name: str, where: Mapping[str, str], folder: str | None) -> str | None:
    """Where file ``name`` goes: where it is placed (``-s PATH``, or ``-o`` naming it), else
    into ``folder``; None without either."""
    if name in where:
        return where[name]
    return None if folder is None else storage.join(folder, name)


def _without_folder(output: OutputOptions) -> OutputOptions:
    """The options of a write without a target: only the DICOM files (for a DICOMweb server)
    and the statistics (to a placed path) are made."""
    dicom = tuple(kind for kind in output.output_type if kind != "nifti")
    kinds = () if output.dicomweb_store is None else dicom
    return output.model_copy(update={"output_type": kinds, "preview": False, "radiomics": False})


def target_folder(output: OutputOptions, target: str) -> str:
    """The folder a write to ``target`` fills: ``target``, or the folder of the file it names."""
    return storage.parent(target) if _named_file(output, target) else target


def _named_file(output: OutputOptions, target: str) -> str | None:
    """The output file ``target`` names, if it names one rather than a folder."""
    first = output.output_type[0]
    if first == "nifti":
        return MULTILABEL_NAME if output.ml and target.endswith((".nii", ".nii.gz")) else None
    return DICOM_NAMES[first] if target.endswith(".dcm") else None
