"""Which slices of a DICOM input make the volume, and how, decided from the headers alone.

A folder or zip may hold scouts beside the axial slices, several series, a gantry-tilted
stack, or slices whose positions drift off a regular grid. ``select_stack``:

- drops localizers (ImageType LOCALIZER, or PROJECTION IMAGE for CT, as dicom2nifti does)
  and, within a series, orientations with fewer than 4 slices (dicom2nifti's rule);
- keeps the largest series whose slices form a volume, with a warning that names the
  others; two usable series of the same size are ambiguous and refused;
- says how the stack converts: ``regular`` (as dicom2nifti and TotalSegmentator convert it,
  unchanged), ``jittered`` (every slice within a fifth of the spacing of a regular grid
  through the end slices: placed on that grid), ``tilted`` (gantry tilt up to 30 degrees:
  resampled onto an orthogonal grid) or ``multiframe`` (one enhanced multi-frame instance).

Anything else (a missing or duplicated slice, mixed orientations, several multi-frame
instances) is refused with an error that says what is wrong and what to do.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raytseg.errors import AmbiguousDicomError, InconsistentDicomError, InvalidImageError

logger = logging.getLogger(__name__)

Layout = Literal["regular", "jittered", "tilted", "multiframe"]

MIN_SLICES = 4  # dicom2nifti converts nothing smaller (validate_slicecount)
MAX_JITTER = 0.2  # largest distance of a slice from the regular grid, in slice spacings
MAX_TILT_DEGREES = 30.0  # more than a CT gantry tilts: the positions are wrong instead
_JITTER_NOTICE = 0.01  # mm: rounding in the position tags, not worth a warning
_ORIENTATION_TOLERANCE = 1e-3  # dicom2nifti's remove_localizers_by_orientation
COMPLETE_SERIES = "Pass one complete series (re-export it from the PACS or the scanner)."


@dataclass(frozen=True)
class Stack:
    """The slices to convert (in input order) and how to convert them."""

    datasets: list[Any]
    layout: Layout
    tilt_degrees: float = 0.0


def select_stack(datasets: list[Any], origin: str) -> Stack:
    """The one stack of ``datasets`` to convert; see the module docstring."""
    images = _drop_localizers(datasets, origin)
    groups: dict[str, list[Any]] = {}
    for ds in images:
        groups.setdefault(str(ds.get("SeriesInstanceUID") or ""), []).append(ds)
    if len(groups) == 1:
        try:
            return check_stack(images)
        except InconsistentDicomError as exc:
            raise InconsistentDicomError(f"{origin}: {exc.message}") from None
    verdicts: list[tuple[str, list[Any], Stack | InvalidImageError]] = []
    for uid, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        try:
            verdicts.append((uid, items, check_stack(items)))
        except InvalidImageError as exc:
            verdicts.append((uid, items, exc))
    return _choose_series(verdicts, origin)


def _choose_series(verdicts: list[tuple[str, list[Any], Stack | InvalidImageError]], origin: str) -> Stack:
    usable = [(uid, len(items), v) for uid, items, v in verdicts if isinstance(v, Stack)]
    lines = "\n".join(_series_line(uid, items, v) for uid, items, v in verdicts)
    if not usable:
        raise InconsistentDicomError(
            f"{origin} holds {len(verdicts)} DICOM series and none of them forms a volume:\n{lines}\n"
            + COMPLETE_SERIES
        )
    if len(usable) > 1 and usable[1][1] == usable[0][1]:
        raise AmbiguousDicomError(
            f"{origin} holds {len(verdicts)} DICOM series:\n{lines}\n"
            "Pass one series: put its slices in a folder or zip of their own."
        )
    chosen, _, stack = usable[0]
    logger.warning(
        "%s holds %d DICOM series; segmenting the largest usable one,\n%s\nIgnored:\n%s",
        origin,
        len(verdicts),
        "\n".join(_series_line(u, i, v) for u, i, v in verdicts if u == chosen),
        "\n".join(_series_line(u, i, v) for u, i, v in verdicts if u != chosen),
    )
    return stack


def _series_line(uid: str, items: list[Any], verdict: Stack | InvalidImageError) -> str:
    description = str(items[0].get("SeriesDescription") or "") or "<no description>"
    reason = "" if isinstance(verdict, Stack) else f" (not usable: {verdict.message.split('. ')[0]})"
    return f"  - {uid or '<no SeriesInstanceUID>'}: {description}, {len(items)} slices{reason}"


def is_localizer(ds: Any) -> bool:
    """dicom2nifti's ``remove_localizers_by_imagetype`` test."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type or (
        str(ds.get("Modality") or "") == "CT" and "PROJECTION IMAGE" in image_type
    )


def _drop_localizers(datasets: list[Any], origin: str) -> list[Any]:
    images = [ds for ds in datasets if not is_localizer(ds)]
    if not images:
        raise InvalidImageError(
            f"{origin} holds only localizer (scout) images. Pass the axial (or other) slices of a series."
        )
    if len(images) < len(datasets):
        logger.info("%s: left out %d localizer image(s).", origin, len(datasets) - len(images))
    return images


def check_stack(datasets: list[Any]) -> Stack:
    """How one series' slices convert, or ``InconsistentDicomError`` saying why they cannot."""
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in datasets):
        if len(datasets) > 1:
            raise InconsistentDicomError(
                f"The series has {len(datasets)} instances and at least one holds several frames. "
                "Pass the one multi-frame instance (or the single-frame slices) of a series."
            )
        return Stack(datasets, "multiframe")
    datasets = _drop_copies(_main_orientation(datasets))
    if len(datasets) < MIN_SLICES:
        raise InconsistentDicomError(
            f"The series has {len(datasets)} slice(s), fewer than {MIN_SLICES}: it is not a volume. "
            + COMPLETE_SERIES
        )
    from dicom2nifti import common

    ordered = common.sort_dicoms(datasets)
    orthogonal = bool(common.is_orthogonal(ordered))
    if orthogonal and not common.is_slice_increment_inconsistent(ordered):
        return Stack(datasets, "regular")
    return _irregular_stack(datasets, ordered, orthogonal)


def _main_orientation(datasets: list[Any]) -> list[Any]:
    """The slices of the series' one orientation; orientations of fewer than 4 slices are
    scouts (dicom2nifti drops them too)."""
    groups: list[tuple[np.ndarray, list[Any]]] = []
    for ds in datasets:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        for known, items in groups:
            if np.allclose(known, orientation, rtol=_ORIENTATION_TOLERANCE, atol=_ORIENTATION_TOLERANCE):
                items.append(ds)
                break
        else:
            groups.append((orientation, [ds]))
    large = [items for _, items in groups if len(items) >= MIN_SLICES]
    if len(groups) > 1 and len(large) > 1:
        raise InconsistentDicomError(
            f"The series mixes {len(large)} slice orientations of {MIN_SLICES} or more slices each. "
            "Pass the slices of one orientation (one reconstruction) in a folder or zip of their own."
        )
    return large[0] if len(groups) > 1 and large else datasets


def _drop_copies(datasets: list[Any]) -> list[Any]:
    """dicom2nifti's ``remove_duplicate_slices``: a slice at the position of an earlier one
    with the same pixels is a copy (only such pairs are decoded here)."""
    first: dict[tuple[float, ...], Any] = {}
    kept = []
    for ds in datasets:
        position = tuple(float(v) for v in ds.ImagePositionPatient)
        if position not in first:
            first[position] = ds
        elif np.array_equal(ds.pixel_array, first[position].pixel_array):
            logger.info("Left out a copy of the slice at %s.", list(position))
            continue
        kept.append(ds)
    return kept


def _irregular_stack(datasets: list[Any], ordered: list[Any], orthogonal: bool) -> Stack:
    """Jitter within ``MAX_JITTER`` and tilt within ``MAX_TILT_DEGREES``, or a refusal."""
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in ordered])
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    spacing = float(np.linalg.norm(step))
    grid = positions[0] + np.outer(np.arange(len(ordered)), step)
    worst = int(np.argmax(np.linalg.norm(positions - grid, axis=1)))
    deviation = float(np.linalg.norm(positions[worst] - grid[worst]))
    if spacing == 0 or deviation > MAX_JITTER * spacing:
        raise InconsistentDicomError(_irregular_message(ordered, positions))
    row_col = np.array([float(v) for v in ordered[0].ImageOrientationPatient])
    normal = np.cross(row_col[:3], row_col[3:])
    cosine = abs(float(np.dot(normal, step))) / (float(np.linalg.norm(normal)) * spacing)
    tilt = math.degrees(math.acos(min(1.0, cosine)))
    if not orthogonal and tilt > MAX_TILT_DEGREES:
        raise InconsistentDicomError(
            f"The slices are stacked {tilt:.1f} degrees off their normal, more than a gantry tilts "
            f"({MAX_TILT_DEGREES:.0f}): their positions are inconsistent. " + COMPLETE_SERIES
        )
    if deviation > _JITTER_NOTICE:
        logger.warning(
            "Slice positions deviate by up to %.2f mm from a regular spacing of %.3f mm; "
            "the slices are placed on the regular grid through the first and last slice.",
            deviation, spacing,
        )  # fmt: skip
    if not orthogonal:
        logger.warning("Gantry tilt of %.1f degrees: the volume is resampled onto an orthogonal grid.", tilt)
        return Stack(datasets, "tilted", tilt)
    return Stack(datasets, "jittered")


def _irregular_message(ordered: list[Any], positions: np.ndarray) -> str:
    """Where the spacing of the slices breaks, for the refusal."""
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    usual = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - usual)))
    where = " and ".join(
        f"instance {ordered[i].get('InstanceNumber', '?')} at {np.round(positions[i], 2).tolist()}"
        for i in (worst, worst + 1)
    )
    return (
        f"The slice spacing of the series is inconsistent: mostly {usual:.3f} mm, but {gaps[worst]:.3f} mm "
        f"between {where}. A slice is missing or duplicated, or the folder mixes acquisitions. "
        + COMPLETE_SERIES
    )
