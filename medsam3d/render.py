"""Pictures for reports: an offscreen VTK rendering of the meshes, and axial slice overlays
with the lesion's contour and its RECIST long/short axes.

Both are written atomically as PNG. Rendering needs an OpenGL context: VTK picks EGL or
OSMesa when no display is present (as on a headless server).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import GeometryError, require
from .io._atomic import atomic_path
from .io._guard import utf8_writable
from .volume import Volume, reorient

log = logging.getLogger(__name__)


def _import_torchvision_first() -> None:
    """Load torchvision before VTK opens an OpenGL/EGL context.

    Importing torchvision (as timm does for LiteMedSAM) *after* VTK has rendered offscreen
    segfaults the process (seen with the vtk 9.x wheel and torch 2.14 CUDA builds); the
    other order is safe, so a process that renders can still load the model later.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed or broken: nothing to protect
        pass


def render_meshes(labels: Volume, path: str | Path, *, labels_to_show: Sequence[int] | None = None,
                  size: tuple[int, int] = (800, 800), smooth: int = 15) -> Path:
    """Render every label's surface (segment colours), seen from the patient's front, head up."""
    _import_torchvision_first()
    vtk = require("vtk", "rendering")
    from .io.labels import segment_table
    from .mesh import label_mesh, write_quietly

    table = segment_table(labels)
    values = list(labels_to_show or table)
    if not values:
        raise GeometryError("expected at least one label to render, found an empty label map")
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(1.0, 1.0, 1.0)
    for value in values:
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(label_mesh(labels, value, smooth=smooth))
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*[float(c) for c in table[value]["color"]])
        actor.GetProperty().SetSpecular(0.3)
        renderer.AddActor(actor)
    renderer.ResetCamera()
    camera = renderer.GetActiveCamera()
    focal = np.array(camera.GetFocalPoint())
    distance = camera.GetDistance()
    camera.SetPosition(*(focal + [0.0, distance, 0.0]))  # from anterior (+A in RAS)
    camera.SetViewUp(0.0, 0.0, 1.0)  # superior up
    renderer.ResetCamera()
    text = vtk.vtkTextActor()
    text.SetInput("anterior view (RAS), superior up")
    text.GetTextProperty().SetColor(0.2, 0.2, 0.2)
    text.GetTextProperty().SetFontSize(16)
    renderer.AddViewProp(text)
    # without a display VTK tries X, warns "bad X server connection" on stderr and renders offscreen
    # (EGL/OSMesa) all the same: its warnings are not the user's business, its errors still are
    verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
    try:
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.AddRenderer(renderer)
        window.SetSize(*size)
        window.Render()
    finally:
        vtk.vtkLogger.SetStderrVerbosity(verbosity)
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = vtk.vtkPNGWriter()
        with utf8_writable(tmp) as name:  # VTK's writers take UTF-8 names only
            writer.SetFileName(name)
            writer.SetInputConnection(grab.GetOutputPort())
            write_quietly(writer, f"the picture to {path}")
    window.Finalize()
    log.info("wrote %s", path)
    return path


def axial_overlay(image: Volume, labels: Volume, path: str | Path, *, label: int = 1,
                  measurement: dict[str, Any] | None = None, window: tuple[float, float] | None = None) -> Path:
    """The axial slice where ``label`` is largest, with its contour and RECIST axes (radiological view)."""
    require("matplotlib", "slice overlays")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.measure import find_contours

    from .measure import measure
    from .preprocess import apply_window, choose_window, finite_intensities

    image.check_same_grid(labels)
    if not np.any(labels.array == label):
        raise GeometryError(f"expected voxels with label {label} to draw, found none")
    if measurement is None:
        measurement = next(r for r in measure(labels.with_array((labels.array == label).astype(np.uint8)),
                                              components=False))
    # radiological display: i -> patient left (image right), j -> posterior (image bottom), k -> superior
    ax_img, _ = reorient(image, ("L", "P", "S"))
    ax_lab, _ = reorient(labels, ("L", "P", "S"))
    mask = ax_lab.array == label
    k = int(np.argmax(mask.sum(axis=(0, 1))))
    if window is None:
        win = choose_window(finite_intensities(image)[0])  # NaN voxels would make every percentile NaN
        window = (win.lower, win.upper)
    from .preprocess import Window

    shown = apply_window(ax_img.array[:, :, k], Window("?", "ct-window", window[0], window[1]))
    si, sj = ax_img.spacing[0], ax_img.spacing[1]
    I, J = shown.shape
    fig, axis = plt.subplots(figsize=(7, 7 * (J * sj) / (I * si)), dpi=110)
    axis.imshow(shown.T, cmap="gray", extent=(-0.5 * si, (I - 0.5) * si, (J - 0.5) * sj, -0.5 * sj),
                interpolation="nearest")
    for contour in find_contours(np.pad(mask[:, :, k].astype(float), 1), 0.5):
        c = contour - 1
        axis.plot(c[:, 0] * si, c[:, 1] * sj, color="yellow", lw=1.2)
    inv = np.linalg.inv(ax_lab.affine)

    def to_mm(ras):
        ijk = inv[:3, :3] @ np.asarray(ras, float) + inv[:3, 3]
        return ijk[0] * si, ijk[1] * sj

    for key, colour in (("long_axis_ras", "red"), ("short_axis_ras", "cyan")):
        if measurement.get(key):
            (x0, y0), (x1, y1) = (to_mm(p) for p in measurement[key])
            axis.plot([x0, x1], [y0, y1], color=colour, lw=2)
    axis.set_title(f"label {label}: long axis {measurement.get('long_axis_mm', 0):.1f} mm, "
                   f"short axis {measurement.get('short_axis_mm', 0):.1f} mm, {measurement['volume_ml']:.2f} mL",
                   fontsize=10)
    axis.text(0.01, 0.5, "R", color="white", transform=axis.transAxes, fontsize=12, va="center")
    axis.text(0.97, 0.5, "L", color="white", transform=axis.transAxes, fontsize=12, va="center")
    axis.set_xlabel("mm")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png", bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s", path)
    return path
