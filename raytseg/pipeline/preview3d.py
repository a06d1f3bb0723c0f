"""``-p/--preview``: TotalSegmentator's 3D preview (``preview_<task>.png``), rendered off-screen.

The picture TotalSegmentator's ``preview.py`` draws: a row of columns seen from the front
with a parallel projection, the first the image's middle sagittal slice in its soft tissue
window (-115..225), then one column per class group of its ``roi_groups`` (the catalogue's
``preview_groups``: bones, organs, vessels, lungs, spine, ribs...), each class a smoothed
surface (marching cubes at half intensity, 20 Laplacian smoothing passes, relaxation 0.1)
in the colour TotalSegmentator's seeded palette gives its place in the group. Pixels are
0.9 per mm, as there.

Written for raytseg with VTK (no fury, no X server): the render window is VTK's off-screen
OSMesa one when libOSMesa is installed (Debian: libosmesa6), else VTK's default (EGL, or X
where ``DISPLAY`` is set). Unlike TotalSegmentator, the image is turned to RAS first, so
the picture does not depend on how the input is stored, and each surface is made from its
class's bounding box only (TotalSegmentator contours the whole volume once per class).
"""

from __future__ import annotations

import ctypes.util
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from raytseg.errors import MissingResourceError
from raytseg.pipeline.records import Segmentation, Volume

if TYPE_CHECKING:
    from collections.abc import Sequence

WINDOW = (-115.0, 225.0)
PIXELS_PER_MM = 0.9
SMOOTHING_PASSES = 20
# TotalSegmentator's palette: np.random.seed(1234); np.random.rand(100, 4), RGB of each row.
PALETTE = np.random.RandomState(1234).rand(100, 4)[:, :3]


def preview3d_png(seg: Segmentation, image: Volume) -> bytes:
    """The PNG bytes of the 3D preview of ``seg`` over ``image``."""
    vtk = _vtk()
    labels = nib.as_closest_canonical(nib.Nifti1Image(seg.labels, seg.affine))
    ct = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(image.data, dtype=np.float32), image.affine))
    zooms = tuple(float(z) for z in labels.header.get_zooms()[:3])
    lab = np.asarray(labels.dataobj)
    column_mm = lab.shape[0] * zooms[0] * PIXELS_PER_MM
    groups = _groups(seg)
    renderer = vtk.vtkRenderer()
    renderer.AddViewProp(_slice_actor(vtk, np.asarray(ct.dataobj), zooms))
    boxes = _label_boxes(lab, seg.label_map)
    for column, group in enumerate(groups, start=1):
        for place, name in enumerate(group):
            if name in boxes:
                actor = _surface(vtk, lab, boxes[name], zooms, PALETTE[place % len(PALETTE)])
                actor.AddPosition(-column * column_mm, 0.0, 0.0)  # screen right is -x
                renderer.AddActor(actor)
    size = (round(column_mm * (len(groups) + 1)), round(lab.shape[2] * zooms[2] * PIXELS_PER_MM))
    return _render(vtk, renderer, size)


def _groups(seg: Segmentation) -> Sequence[Sequence[str]]:
    """The task's groups; one group of every class where it has none (or is no catalogue task)."""
    from raytseg.tasks import load_catalog

    task = load_catalog().tasks.get(seg.task)
    groups = None if task is None else task.preview_groups
    return groups if groups is not None else (tuple(seg.label_map.values()),)


def _label_boxes(labels: np.ndarray, classes: dict[int, str]) -> dict[str, tuple[int, tuple[slice, ...]]]:
    """``{class: (label, bounding box)}`` of the classes present, from one pass over the labels."""
    from scipy import ndimage

    boxes = ndimage.find_objects(labels)
    return {
        name: (idx, boxes[idx - 1])
        for idx, name in classes.items()
        if 0 < idx <= len(boxes) and boxes[idx - 1] is not None
    }


def _surface(
    vtk: Any,
    labels: np.ndarray,
    box: tuple[int, tuple[slice, ...]],
    zooms: tuple[float, ...],
    colour: np.ndarray,
) -> Any:
    """A smoothed surface of one label (RAS voxels) in mm, from its bounding box (+1 voxel) only."""
    label, extent = box
    start = [max(s.start - 1, 0) for s in extent]
    crop = labels[tuple(slice(a, s.stop + 1) for a, s in zip(start, extent, strict=True))] == label
    grid = _image_data(
        vtk, crop.astype(np.uint8) * 255, zooms, [a * z for a, z in zip(start, zooms, strict=True)]
    )
    contour = vtk.vtkMarchingCubes()
    contour.SetInputData(grid)
    contour.SetValue(0, 100)
    smoother = vtk.vtkSmoothPolyDataFilter()
    smoother.SetInputConnection(contour.GetOutputPort())
    smoother.SetNumberOfIterations(SMOOTHING_PASSES)
    smoother.SetRelaxationFactor(0.1)
    smoother.SetFeatureAngle(60)
    smoother.FeatureEdgeSmoothingOff()
    smoother.BoundarySmoothingOff()
    smoother.SetConvergence(0)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(smoother.GetOutputPort())
    normals.SetFeatureAngle(60.0)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*(float(c) for c in colour))
    return actor


def _slice_actor(vtk: Any, ct: np.ndarray, zooms: tuple[float, ...]) -> Any:
    """The middle sagittal slice in the soft tissue window, facing the front camera."""
    lo, hi = WINDOW
    plane = ct[ct.shape[0] // 2]  # (y, z): posterior..anterior, inferior..superior
    grey = (np.clip((plane - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    grid = _image_data(vtk, grey[:, :, None], (zooms[1], zooms[2], 1.0), (0.0, 0.0, 0.0))
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(grid)
    actor.RotateX(90)  # the slice's (y, z) plane onto the screen's (x, z) plane
    return actor


def _image_data(vtk: Any, array: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> Any:
    from vtkmodules.util import numpy_support

    grid = vtk.vtkImageData()
    grid.SetDimensions(*array.shape)
    grid.SetSpacing(*spacing)
    grid.SetOrigin(*origin)
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()  # VTK: x fastest
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)  # type: ignore[no-untyped-call]
    grid.GetPointData().SetScalars(scalars)
    return grid


def _render(vtk: Any, renderer: Any, size: tuple[int, int]) -> bytes:
    """Front view (camera anterior, looking back, superior up), parallel, fitted tightly."""
    _fit_front_camera(renderer, size[0] / max(size[1], 1))
    window = _window(vtk)
    window.SetOffScreenRendering(1)
    window.AddRenderer(renderer)
    window.SetSize(max(size[0], 1), max(size[1], 1))
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.WriteToMemoryOn()
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    png = bytes(memoryview(writer.GetResult()))
    window.Finalize()
    return png


def _fit_front_camera(renderer: Any, aspect: float, margin: float = 1.02) -> None:
    """What TotalSegmentator's ``reset_camera_tight(margin_factor=1.02)`` does, for a camera
    in front of the patient: everything visible, the longer side filling the picture."""
    x0, x1, y0, y1, z0, z1 = renderer.ComputeVisiblePropBounds()
    centre = ((x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2)
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1] + (y1 - y0) + 1000.0, centre[2])
    camera.SetViewUp(0.0, 0.0, 1.0)
    camera.ParallelProjectionOn()
    camera.SetParallelScale(margin * max((z1 - z0) / 2, (x1 - x0) / 2 / aspect))
    renderer.ResetCameraClippingRange()


def _window(vtk: Any) -> Any:
    if ctypes.util.find_library("OSMesa"):
        from vtkmodules.vtkRenderingOpenGL2 import vtkOSOpenGLRenderWindow

        return vtkOSOpenGLRenderWindow()
    return vtk.vtkRenderWindow()


def _vtk() -> Any:
    try:
        import vtkmodules.all as vtk
    except ImportError as exc:
        raise MissingResourceError(
            "The 3D preview needs VTK: pip install 'raytseg[tools]' (and libosmesa6 to render "
            "without a display), or ask for the 2D overview: --preview_kind 2d."
        ) from exc
    return vtk
