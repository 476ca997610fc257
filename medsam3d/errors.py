"""The medsam3d error hierarchy.

Every error a user can cause (bad path, bad file, bad prompt, bad grid, missing model)
is a :class:`Medsam3dError`. Its message is one line in the form *expected X, found Y,
do Z*. The CLI prints it and exits with code 2; anything else is a bug.
"""

from __future__ import annotations


class Medsam3dError(Exception):
    """Base class of every error medsam3d raises on purpose."""


class VolumeIOError(Medsam3dError, OSError):
    """A file or folder cannot be read or written as a medical image."""


class DicomSeriesError(VolumeIOError):
    """A DICOM folder holds no series, several series without a choice, or a broken one."""


class GeometryError(Medsam3dError, ValueError):
    """Grids do not match, an affine is invalid, or a geometry cannot be represented."""


class PromptError(Medsam3dError, ValueError):
    """A prompt (box, slice, ROI, prompt file) is invalid for the volume it targets."""


class FollowUpError(Medsam3dError, ValueError):
    """Studies cannot be followed over time: a transferred object lands outside the target image,
    or the studies of a patient cannot be put in order."""


class ModelError(Medsam3dError, RuntimeError):
    """A model or checkpoint cannot be loaded, or the device is unavailable."""


class MissingDependencyError(Medsam3dError, ImportError):
    """An optional dependency needed for this feature is not installed."""


def require(module: str, feature: str, *, extra: str | None = None):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the feature.

    ``extra``: the optional dependency group of medsam3d that brings the package (for
    example ``sam``); without it the package is a core dependency, and a failure means a
    broken install.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        package = module.split(".")[0].replace("_", "-")
        fix = f"install it with: pip install 'medsam3d[{extra}]'" if extra else f"reinstall it with: pip install {package}"
        raise MissingDependencyError(
            f"expected the Python package '{package}' for {feature}, found it not importable ({exc}); {fix}"
        ) from exc


class DetectorError(ModelError):
    """A text-prompt detector cannot be loaded, or gave an answer that is not a detection."""


class ManifestError(Medsam3dError, ValueError):
    """A batch manifest cannot be run as written (a missing column, a duplicate case, a bad cell): nothing ran."""


class BatchError(Medsam3dError):
    """A batch cannot start: a bad option, or an output folder in use or not writable: nothing ran."""
