"""Typed records that flow between the pipeline stages.

    load ──Volume──▶ preprocess ──NetworkInput×n──▶ model ──NetworkOutput×n──▶ postprocess
                         │                                                     ▲
                         └───────────────── InverseRecord ─────────────────────┘
    postprocess ──Segmentation──▶ export

Axis convention: every array outside the model stage is indexed in the image's voxel
order (i, j, k) as nibabel reads it, with a 4x4 voxel-to-RAS affine beside it. The
network sees nnU-Net's (channel, z, y, x) order; ``raytseg.pipeline.axes`` is the one
place that converts. Records are frozen and picklable: the model stage may run in
another process (a Ray actor) than the stages around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raytseg.pipeline.labeltable import add_label_table

OutputType = Literal["nifti", "dicom_seg", "dicom_rtstruct"]
DICOM_OUTPUTS = frozenset({"dicom_seg", "dicom_rtstruct"})
OUTPUT_TYPE_ALIASES = {"dicom": "dicom_rtstruct"}  # TotalSegmentator's name before 2.12
# -sp's files (TotalSegmentator's): nnU-Net's probabilities and, beside them, its properties.
PROBABILITIES_NAME = "probabilities.npz"
PROPERTIES_NAME = "probabilities.pkl"
STATISTICS_NAME = "statistics.json"  # the statistics file, in an output folder or where -s PATH puts it

Spacing = tuple[float, float, float]
Shape3 = tuple[int, int, int]
# Half-open voxel ranges [lo, hi) per axis.
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Volume:
    """An image as loaded: its voxels, affine and header.

    ``data`` holds the stored values with NIfTI scaling applied (nibabel's ``dataobj``):
    the file's integer dtype when unscaled, float64 otherwise. ``header`` is copied into
    every output so masks line up with the input in any viewer.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    modality: str | None = None  # DICOM Modality tag ("CT", "MR") when known
    source: str = "<memory>"
    # A DICOM input's slice headers (pydicom datasets, pixel data left out), in file order:
    # what DICOM-SEG and RTSTRUCT outputs reference. Empty for NIfTI input.
    series: tuple[Any, ...] = ()

    @property
    def shape(self) -> Shape3:
        s = self.data.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def zooms(self) -> Spacing:
        z = self.header.get_zooms()
        return (float(z[0]), float(z[1]), float(z[2]))

    def to_nifti(self) -> nib.Nifti1Image:
        return nib.Nifti1Image(self.data, self.affine, self.header)


@dataclass(frozen=True)
class Flag:
    """How an option is spelled on the command line besides ``--<name>``: TotalSegmentator's
    short alias. ``raytseg.options`` derives the CLI flags, the batch flags and the HTTP
    parameters from the fields that carry one."""

    short: str | None  # None: raytseg's own option, spelled ``--<name>`` only
    const: float | None = None  # the value of the flag given alone (``-rmb`` means 200 mm³)
    negated: str | None = None  # the flag switches a default-true option off (``--no_derived_masks``)
    # The file a bool flag writes into the output folder, which ``-s PATH`` (TotalSegmentator's
    # spelling) places at PATH instead: the CLI and the Python API only.
    file: str | None = None
    alias: str | None = None  # TotalSegmentator's second long spelling (``--high_order_resampling``)
    # A second file the flag writes; a path that places ``file`` places it there with this
    # suffix instead of ``file``'s (``-sp PATH.npz``: the properties at ``PATH.pkl``).
    beside: str | None = None


class SegmentOptions(BaseModel):
    """What the user asked for, with TotalSegmentator's option names and defaults.

    This class is the only declaration of an option: add a field (with a ``Flag``) and it
    is a ``raytseg segment`` and ``raytseg batch`` flag, a batch config key and an HTTP
    query parameter.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Annotated[str, Flag("-ta")] = Field(
        default="total",
        description="Task name, e.g. total, total_mr, body, lung_vessels (raytseg tasks); "
        "auto: total or total_mr, chosen from the image (the choice and its reason are reported).",
    )
    fast: Annotated[bool, Flag("-f")] = Field(
        default=False, description="Lower-resolution model: 3 mm (total, total_mr), 6 mm (body)."
    )
    fastest: Annotated[bool, Flag("-ff")] = Field(
        default=False, description="Lowest-resolution model: 6 mm (total, total_mr)."
    )
    roi_subset: Annotated[tuple[str, ...] | None, Flag("-rs")] = Field(
        default=None, description="Only predict these classes."
    )
    robust_crop: Annotated[bool, Flag("-rc")] = Field(
        default=False, description="Find crop regions with the 3 mm model."
    )
    body_seg: Annotated[bool, Flag("-bs")] = Field(default=False, description="Crop to the body first (CT).")
    force_split: Annotated[bool, Flag("-fs")] = Field(
        default=False, description="Predict in three overlapping z chunks."
    )
    model_size: Annotated[Literal["big", "small"], Flag("-ms")] = Field(
        default="big",
        description="small: task total_v3's ResEnc-L models (nnUNetResEncUNetLPlans_8), as TotalSegmentator.",
    )
    v1_order: Annotated[bool, Flag("-v1o")] = Field(
        default=False,
        description="Task total: number the output's classes as TotalSegmentator 1 did (its 104 "
        "classes; classes it lacked are dropped). Other tasks ignore it, as TotalSegmentator does.",
    )
    nr_thr_resamp: Annotated[int, Flag("-nr")] = Field(
        default=1,
        ge=1,
        description="TotalSegmentator's resampling threads. Accepted and without effect: raytseg "
        "resamples in one in-process call per pass, on torch's threads (the process's CPU share).",
    )
    resampling_order: Annotated[int, Flag("-ro")] = Field(
        default=1,
        ge=0,
        le=5,
        description="Spline order (0-5) of resampling the image to the model's spacing.",
    )
    save_lowres: Annotated[bool, Flag("-sl")] = Field(
        default=False,
        description="Keep the masks on the --fast/--fastest model's grid instead of resampling "
        "them back to the input's (NIfTI outputs only).",
    )
    higher_order_resampling: Annotated[bool, Flag("-ho", alias="--high_order_resampling")] = Field(
        default=False,
        description="Give the model the image on its own grid (no resampling to the model's "
        "spacing first): nnU-Net resamples it, and its logits back to the input's grid, itself "
        "(TotalSegmentator 2.18 with nnU-Net 2.8.1, whose export has no cropped-logits variant).",
    )
    save_probabilities: Annotated[bool, Flag("-sp", file=PROBABILITIES_NAME, beside=PROPERTIES_NAME)] = Field(
        default=False,
        description=f"Also write nnU-Net's softmax probabilities of the main pass's last model (of "
        f"the first z chunk with -fs), on the grid the model was given, as TotalSegmentator does: "
        f"{PROBABILITIES_NAME} (key 'probabilities', float32, classes x nnU-Net's z, y, x) and "
        f"nnU-Net's properties of that input as {PROPERTIES_NAME}. Large: about 1 GB per 2 "
        "million voxels of a 118-class model's grid.",
    )
    # TotalSegmentator's spelling, capitals included (its CLI flag and Python API keyword).
    higher_order_resampling_LEGACY: Annotated[bool, Flag("--high_order_resampling_LEGACY")] = Field(  # noqa: N815
        default=False,
        description="LEGACY: upsample the final masks smoothly (each class's one-hot mask, "
        "cropped to its box, at order 1), as TotalSegmentator's flag of that name.",
    )
    statistics: Annotated[bool, Flag("-s", file=STATISTICS_NAME)] = Field(
        default=False, description="Write statistics.json: volume and mean intensity per class."
    )
    stats_include_incomplete: Annotated[bool, Flag("-sii")] = Field(
        default=False, description="Also compute statistics for classes touching the image border."
    )
    stats_aggregation: Annotated[Literal["mean", "median"], Flag("-sa")] = Field(
        default="mean", description="How statistics aggregate intensities."
    )
    statistics_extra: Annotated[bool, Flag("-sx")] = Field(
        default=False,
        description="Statistics also give n_voxels, intensity std/min/max, centroid_vox, bbox_vox.",
    )
    statistics_normalized_intensities: Annotated[bool, Flag(None)] = Field(
        default=False,
        description="Statistics on intensities scaled to 0..1 by the image's minimum and maximum "
        "(TotalSegmentator's Python API option, used by get-modality -n).",
    )
    remove_small_blobs: Annotated[float | None, Flag("-rmb", const=200.0)] = Field(
        default=None, gt=0, description="Remove connected components smaller than this (mm³; alone: 200)."
    )


class OutputOptions(BaseModel):
    """Which files a segmentation produces, declared once like ``SegmentOptions``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ml: Annotated[bool, Flag("-ml")] = Field(
        default=False, description="One multilabel file (segmentation.nii.gz) instead of one file per class."
    )
    derived_masks: Annotated[bool, Flag("-ndm", negated="no_derived_masks")] = Field(
        default=True, description="body.nii.gz and skin.nii.gz beside task body's per-class masks."
    )
    preview: Annotated[bool, Flag("-p")] = Field(
        default=False, description="Also write preview_<task>.png: TotalSegmentator's 3D rendering."
    )
    preview_kind: Annotated[Literal["3d", "2d"], Flag(None)] = Field(
        default="3d",
        description="3d: TotalSegmentator's surface rendering (VTK, off-screen); 2d: raytseg's "
        "coronal and sagittal overview, which needs no graphics library.",
    )
    skip_saving: Annotated[bool, Flag("-ss")] = Field(
        default=False,
        description="Write no masks (statistics.json and the preview still), as TotalSegmentator.",
    )
    radiomics: Annotated[bool, Flag("-r")] = Field(
        default=False,
        description="Also write statistics_radiomics.json: TotalSegmentator's pyradiomics features "
        "(shape and first order, at 3 mm) of each class mask file.",
    )
    output_type: Annotated[tuple[OutputType, ...], Flag("-ot")] = Field(
        default=("nifti",),
        min_length=1,
        description="nifti, dicom_seg and/or dicom_rtstruct (dicom: dicom_rtstruct), e.g. -ot nifti "
        "dicom_seg. DICOM outputs need DICOM input and make the result multilabel.",
    )
    nr_thr_saving: Annotated[int, Flag("-ns")] = Field(
        default=6,
        ge=1,
        description="Threads that compress the per-class mask files (at most the usable CPUs).",
    )
    dicom_seg_type: Annotated[Literal["binary", "labelmap"], Flag(None)] = Field(
        default="binary",
        description="DICOM-SEG encoding: binary (one frame per segment and slice, as "
        "TotalSegmentator) or labelmap (one frame per slice, RLE-compressed: much smaller).",
    )
    dicomweb_store: Annotated[str | None, Flag(None)] = Field(
        default=None,
        description="Also store the DICOM outputs on this DICOMweb server with STOW-RS "
        "(dicomweb+https://host/prefix); an instance the server holds already is not sent again.",
    )

    @field_validator("output_type", mode="before")
    @classmethod
    def _split_output_types(cls, value: Any) -> Any:
        """TotalSegmentator's spellings: ``a,b`` lists, the old ``dicom`` alias, repeats."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return value
        names = [n.strip() for item in value for n in str(item).split(",") if n.strip()]
        return tuple(dict.fromkeys(OUTPUT_TYPE_ALIASES.get(n, n) for n in names))

    @model_validator(mode="before")
    @classmethod
    def _dicom_is_multilabel(cls, values: Any) -> Any:
        """A DICOM output holds every class: the NIfTI beside it is the multilabel file too."""
        if (
            isinstance(values, dict)
            and set(cls._split_output_types(values.get("output_type", ()))) & DICOM_OUTPUTS
        ):
            return {**values, "ml": True}
        return values

    @model_validator(mode="after")
    def _radiomics_reads_class_masks(self) -> OutputOptions:
        if self.radiomics and (self.ml or self.skip_saving or "nifti" not in self.output_type):
            raise ValueError(
                "radiomics is computed on the per-class mask files, as TotalSegmentator does: use it "
                "without --ml (which DICOM outputs imply) and without --skip_saving."
            )
        return self

    @model_validator(mode="after")
    def _stores_dicom(self) -> OutputOptions:
        if self.dicomweb_store is not None:
            from raytseg.dicomweb import parse

            if not parse(self.dicomweb_store).is_server:
                raise ValueError("dicomweb_store must name a DICOMweb server: dicomweb+https://host/prefix")
            if not self.dicom:
                raise ValueError("dicomweb_store stores DICOM outputs: add -ot dicom_seg / dicom_rtstruct")
        return self

    @property
    def dicom(self) -> bool:
        """Whether a DICOM file is asked for (these need DICOM input)."""
        return bool(set(self.output_type) & DICOM_OUTPUTS)


@dataclass(frozen=True)
class CaseGeometry:
    """nnU-Net's bookkeeping for one network input, in network (z, y, x) axes."""

    spacing: Spacing
    shape_before_cropping: Shape3
    bbox_used_for_cropping: Box
    shape_after_cropping_and_before_resampling: Shape3

    def as_nnunet_properties(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "shape_before_cropping": self.shape_before_cropping,
            "bbox_used_for_cropping": [list(b) for b in self.bbox_used_for_cropping],
            "shape_after_cropping_and_before_resampling": self.shape_after_cropping_and_before_resampling,
        }


@dataclass(frozen=True)
class NetworkInput:
    """One normalised array for one network: the model stage's whole input."""

    model_key: str
    chunk: int  # index of the z chunk when the image is split, else 0
    data: np.ndarray  # float32 (channels, z, y, x), cropped to non-zero and normalised
    geometry: CaseGeometry
    step_size: float  # sliding-window step as a fraction of the patch (0.8 for total*)
    cropped_logits: bool = False  # back to the input grid per class box (-ho; cropped_logits.py)
    probabilities: bool = False  # also return nnU-Net's softmax output (-sp)


@dataclass(frozen=True)
class NetworkOutput:
    """Labels one network predicted for one chunk, back in canonical voxel order."""

    model_key: str
    chunk: int
    labels: np.ndarray  # uint8 (i, j, k) of the resampled canonical chunk; model-local ids
    probabilities: np.ndarray | None = None  # float32 (classes, z, y, x) when the input asked (-sp)
    # What computed it (pipeline.backends: torch, openvino); no default, so that a new
    # network kind cannot be reported as torch by omission.
    backend: str = field(kw_only=True)


@dataclass(frozen=True)
class Probabilities:
    """One network's softmax output and nnU-Net's properties of its input: the two files of
    TotalSegmentator's ``-sp`` (``probabilities.npz``, ``probabilities.pkl``)."""

    values: np.ndarray  # float32 (classes, z, y, x), nnU-Net's reader axes of the model grid
    properties: dict[str, Any]  # as NibabelIOWithReorient and nnU-Net's preprocessor make them


@dataclass(frozen=True)
class ChunkSplit:
    """TotalSegmentator's three z chunks: [0, third+m), [third+1-m, 2*third+m), [2*third+1-m, end)."""

    third: int
    margin: int = 20


@dataclass(frozen=True)
class InverseRecord:
    """What postprocessing needs to put model-grid labels back on the input grid."""

    original_shape: Shape3
    original_affine: np.ndarray
    original_header: nib.Nifti1Header
    crop_box: Box | None  # in original voxels; None when not cropped
    canonical_shape: Shape3  # after crop and reorientation, before resampling
    canonical_affine: np.ndarray
    model_shape: Shape3  # the grid the networks saw (resampled canonical)
    model_affine: np.ndarray
    model_zooms: Spacing  # as a NIfTI header stores them (float32)
    resampled: bool
    split: ChunkSplit | None


@dataclass(frozen=True)
class Prepared:
    """Preprocessing result: network inputs plus what is needed to undo it.

    ``model_image`` (the resampled canonical image, before normalisation) is kept only
    when statistics are computed on the model grid (``--fast --statistics``).
    """

    inputs: tuple[NetworkInput, ...]
    inverse: InverseRecord
    model_image: np.ndarray | None = None


@dataclass(frozen=True)
class TaskChoice:
    """What ``task=auto`` ran, and why (``pipeline.modality.choose_task``)."""

    task: str  # total or total_mr
    modality: Literal["CT", "MR"]
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"task": self.task, "modality": self.modality, "reason": self.reason}


@dataclass(frozen=True)
class Segmentation:
    """A label map on the input's voxel grid, ready to export."""

    labels: np.ndarray  # uint8 (i, j, k), same shape as the input
    affine: np.ndarray
    header: nib.Nifti1Header  # input header, data dtype uint8
    label_map: dict[int, str]  # the classes this output reports (roi_subset applied)
    task: str
    statistics: dict[str, dict[str, float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    probabilities: Probabilities | None = None  # -sp
    task_choice: TaskChoice | None = None  # task=auto's decision
    backends: dict[str, str] = field(default_factory=dict)  # model key -> what ran it, every pass

    def to_nifti(self, *, with_label_table: bool = True) -> nib.Nifti1Image:
        """The multilabel image; with TotalSegmentator's XML label table when asked."""
        img = nib.Nifti1Image(self.labels, self.affine, self.header.copy())
        return add_label_table(img, self.label_map) if with_label_table else img
