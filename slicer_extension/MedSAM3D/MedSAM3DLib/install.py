"""Installing medsam3d into Slicer's Python, for the in-process mode, without breaking Slicer.

medsam3d is not on PyPI: it is installed from a wheel (``medsam3d-X.Y.Z-py3-none-any.whl``)
or a source folder (with ``pyproject.toml``) the user gives, and only after the user agreed
(:func:`ensure_medsam3d` asks with ``slicer.util.confirmOkCancelDisplay``; nothing is ever
installed when the module is imported or its widget built). Server mode needs none of this.

Slicer ships its own numpy, VTK and SimpleITK, built with and for Slicer. medsam3d lists
numpy, vtk and SimpleITK among its dependencies; a plain ``pip install medsam3d.whl`` could
replace numpy with another version under Slicer's feet, or drop a PyPI ``vtk`` wheel next to
Slicer's VTK. So the install is done in two steps (:func:`install_plan`):

1. ``pip install --no-deps <wheel or folder>``: medsam3d itself, none of its dependencies;
2. ``pip install -c constraints.txt <its dependencies minus numpy, vtk, SimpleITK>``, where
   the constraints file pins each package Slicer provides to the version Slicer has
   (``numpy==2.x``, ``SimpleITK==2.y`` as ``importlib.metadata`` reports them). A package
   Slicer provides without pip metadata (Slicer's VTK is built by its superbuild, not
   installed by pip) is constrained to ``vtk<0``: should another dependency want it, pip
   stops with a conflict instead of installing a second VTK.

A dependency whose resolution would need another numpy therefore fails loudly (pip reports
the conflict) and leaves Slicer as it was. When the ``PyTorchUtils`` extension is installed,
torch comes from it (it picks the build that matches the GPU driver) before step 2.
Everything here except :func:`ensure_medsam3d` runs without Slicer and is tested outside it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

#: packages Slicer provides and medsam3d's install must never replace (distribution name -> import name)
PROVIDED_BY_SLICER = {"numpy": "numpy", "vtk": "vtk", "SimpleITK": "SimpleITK"}
#: the requirement a ready in-process mode needs (also in Resources/requirements.txt)
MEDSAM3D_REQUIREMENT = "medsam3d>=0.1"


class InstallError(Exception):
    """medsam3d could not be installed (no source given, unreadable source, or pip failed)."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The distribution name a requirement string starts with (``"vtk>=9.3"`` -> ``"vtk"``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise InstallError(f"expected a requirement like 'numpy>=1.23', found {requirement!r}")
    return match.group(1)


def medsam3d_requirements(source: str) -> List[str]:
    """medsam3d's runtime dependencies as its wheel's ``Requires-Dist`` or its source folder's
    ``pyproject.toml`` list them (extras' dependencies left out)."""
    source = os.path.expanduser(str(source))
    if os.path.isdir(source):
        path = os.path.join(source, "pyproject.toml")
        if not os.path.isfile(path):
            raise InstallError(f"expected a medsam3d source folder with a pyproject.toml, found none in {source}")
        try:
            import tomllib
        except ImportError:  # Python < 3.11 (Slicer < 5.10)
            raise InstallError("reading a source folder needs Python 3.11 or later; give a medsam3d wheel "
                               "(pip wheel --no-deps <folder>) instead") from None
        with open(path, "rb") as handle:
            project = tomllib.load(handle).get("project", {})
        if project.get("name", "").lower() != "medsam3d":
            raise InstallError(f"expected the medsam3d project in {path}, found {project.get('name')!r}")
        return [str(r) for r in project.get("dependencies", [])]
    if source.endswith(".whl") and os.path.isfile(source):
        with zipfile.ZipFile(source) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
            if not names or not os.path.basename(source).lower().startswith("medsam3d-"):
                raise InstallError(f"expected a medsam3d wheel, found {os.path.basename(source)}")
            metadata = wheel.read(names[0]).decode("utf-8")
        requirements = []
        for line in metadata.splitlines():
            if not line.strip():
                break  # the headers end at the first blank line
            if line.startswith("Requires-Dist:"):
                value = line.split(":", 1)[1].strip()
                if not re.search(r"\bextra\s*==", value):
                    requirements.append(value)
        return requirements
    raise InstallError(f"expected a medsam3d wheel (.whl) or source folder, found {source!r}")


def provided_versions() -> Dict[str, Optional[str]]:
    """For each package Slicer provides: its pip version, ``""`` when it is importable without
    pip metadata (Slicer's own VTK), or ``None`` when it is absent."""
    out: Dict[str, Optional[str]] = {}
    for dist, module in PROVIDED_BY_SLICER.items():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "" if importlib.util.find_spec(module) is not None else None
    return out


@dataclass
class InstallPlan:
    """What :func:`ensure_medsam3d` will run: ``pip install --no-deps <source>``, then
    ``pip install -c <constraints> <dependencies>``."""

    source: str
    dependencies: List[str]
    constraints: List[str]
    kept: Dict[str, str] = field(default_factory=dict)  # provided package -> the version Slicer keeps

    def constraints_text(self) -> str:
        return "".join(line + "\n" for line in self.constraints)

    def describe(self) -> str:
        kept = ", ".join(f"{k} {v or '(Slicer build)'}" for k, v in self.kept.items()) or "none"
        return (f"Install medsam3d into Slicer's Python from\n  {self.source}\n\n"
                f"and its dependencies ({len(self.dependencies)} packages from PyPI, several GB with torch):\n  "
                + ", ".join(requirement_name(r) for r in self.dependencies)
                + f"\n\nSlicer's own packages are kept as they are: {kept}.\n"
                "This modifies Slicer's Python environment; a restart of Slicer may be needed.")


def install_plan(source: str, provided: Optional[Dict[str, Optional[str]]] = None,
                 requirements: Optional[List[str]] = None) -> InstallPlan:
    """The two pip steps for ``source`` (see the module docstring); ``provided`` defaults to
    :func:`provided_versions` of the running Python, ``requirements`` to medsam3d's own."""
    provided = provided_versions() if provided is None else provided
    requirements = medsam3d_requirements(source) if requirements is None else requirements
    present = {_canonical(name): (name, version) for name, version in provided.items() if version is not None}
    dependencies = [r for r in requirements if _canonical(requirement_name(r)) not in present]
    constraints = []
    kept = {}
    for name, version in present.values():
        constraints.append(f"{name}=={version}" if version else f"{name}<0")
        kept[name] = version
    return InstallPlan(os.path.expanduser(str(source)), dependencies, constraints, kept)


def medsam3d_available() -> bool:
    """True when ``import medsam3d`` would work (checked without importing it)."""
    importlib.invalidate_caches()
    return importlib.util.find_spec("medsam3d") is not None


def ensure_medsam3d(source: Optional[str], *, ask: bool = True) -> bool:
    """Make ``import medsam3d`` work in Slicer's Python (Slicer only).

    Returns True when medsam3d is importable (already, or after installing it from ``source``),
    False when the user declined. Raises :class:`InstallError` when no source is given or pip
    fails. Call it from a button's handler, never at import.
    """
    if medsam3d_available():
        return True
    if not source:
        raise InstallError("medsam3d is not installed in Slicer's Python; give its wheel (.whl) or source folder "
                           "in 'medsam3d package' and press Apply again, or use a medsam3d server")
    import slicer

    plan = install_plan(source)
    if ask and not slicer.util.confirmOkCancelDisplay(plan.describe(), "MedSAM3D - install medsam3d"):
        return False
    _install_torch_if_possible()
    handle, constraints = tempfile.mkstemp(prefix="medsam3d-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(plan.constraints_text())
        try:
            import slicer.packaging as packaging  # Slicer >= 5.11: progress dialog, constraints, no-deps
        except ImportError:
            packaging = None
        try:
            if packaging is not None:
                packaging.pip_install(plan.dependencies, constraints=constraints,
                                      no_deps_requirements=[plan.source], requester="MedSAM3D")
            else:
                slicer.util.pip_install(["--no-deps", plan.source])
                slicer.util.pip_install(["-c", constraints, *plan.dependencies])
        except Exception as exc:  # CalledProcessError and friends: pip said why in its log
            raise InstallError(f"pip could not install medsam3d ({exc}); see the Python console for pip's "
                               "message (a version conflict with Slicer's numpy/VTK/SimpleITK is reported there)"
                               ) from exc
    finally:
        os.unlink(constraints)
    if not medsam3d_available():
        raise InstallError("pip finished but medsam3d cannot be imported; restart Slicer and try again")
    return True


def _install_torch_if_possible() -> None:
    """torch through the PyTorchUtils extension when it is installed (it matches the GPU driver);
    otherwise pip installs PyPI's default torch build with the other dependencies."""
    try:
        import PyTorchUtils  # noqa: F401 - the extension's module, present only when installed
    except ImportError:
        return
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        logic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.1")
