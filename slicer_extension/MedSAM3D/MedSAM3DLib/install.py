"""Installing medsam3d into Slicer's Python, for the in-process mode, without breaking Slicer.

medsam3d is not on PyPI: it is installed from a wheel (``medsam3d-X.Y.Z-py3-none-any.whl``)
or a source folder (with ``pyproject.toml``) the user gives, and only after the user agreed
(:func:`ensure_medsam3d` asks with ``slicer.util.confirmOkCancelDisplay``; nothing is ever
installed when the module is imported or its widget built). Server mode needs none of this.

Slicer ships its own Python packages, built with and for Slicer: numpy, VTK and SimpleITK,
but also pydicom, Pillow, requests, scipy, packaging and more (whatever the Slicer build and
other extensions put there). A plain ``pip install medsam3d.whl`` could upgrade any of them
under Slicer's feet (numpy for a dependency that wants a newer one, Pillow, requests...), or
drop a PyPI ``vtk`` wheel next to Slicer's VTK. So the install is done in two steps
(:func:`install_plan`):

1. ``pip install --no-deps <wheel or folder>``: medsam3d itself, none of its dependencies;
2. ``pip install -c constraints.txt <its dependencies minus numpy, vtk, SimpleITK>``, where
   the constraints file (:func:`constraint_lines`) pins **every** distribution installed in
   Slicer's Python to its installed version, one line each as ``importlib.metadata``
   reports them (``numpy==2.2.6``, ``pydicom==3.0.1``, ``Pillow==11.2.1``, ``requests==2.32.3``
   ...; ``===`` for a version that is not PEP 440). A package Slicer provides without pip
   metadata (Slicer's VTK is built by its superbuild, not installed by pip) is constrained to
   ``vtk<0``: should another dependency want it, pip stops with a conflict instead of
   installing a second VTK. medsam3d itself is left out (step 1 installs it).

pip may therefore only *add* packages Slicer does not have: a dependency whose resolution
would need another version of anything already installed fails loudly (pip reports the
conflict, the message is in Slicer's Python console) and leaves Slicer as it was. The
confirmation dialog lists how many packages are pinned and the notable ones. When the
``PyTorchUtils`` extension is installed, torch comes from it (it picks the build that
matches the GPU driver) before step 2, and the constraints are read after it, so torch is
kept at the version PyTorchUtils chose. Everything here except :func:`ensure_medsam3d` runs
without Slicer and is tested outside it.
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
from typing import Any, Dict, Iterable, List, Optional

#: packages Slicer provides and medsam3d's install must never replace (distribution name -> import name)
PROVIDED_BY_SLICER = {"numpy": "numpy", "vtk": "vtk", "SimpleITK": "SimpleITK"}
#: pinned packages named in the confirmation dialog when present (the others are counted)
NOTABLE = ("numpy", "vtk", "SimpleITK", "scipy", "torch", "pydicom", "Pillow", "requests", "packaging",
           "scikit-image", "nibabel", "setuptools")
#: distributions never constrained: the package being installed
NOT_CONSTRAINED = ("medsam3d",)
#: a PEP 440 version (public part and optional local label); anything else is pinned with ``===``
_PEP440 = re.compile(r"^\s*v?(?:\d+!)?\d+(?:\.\d+)*(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?"
                     r"(?:-\d+|[-_.]?(?:post|rev|r)[-_.]?\d*)?(?:[-_.]?dev[-_.]?\d*)?"
                     r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?\s*$", re.I)
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


def installed_versions(distributions: Optional[Iterable[Any]] = None) -> Dict[str, str]:
    """Every installed distribution -> its version (``{"numpy": "2.2.6", "Pillow": "11.2.1", ...}``),
    from ``importlib.metadata.distributions()`` by default. A name met twice (two copies on
    ``sys.path``) keeps the first, the one ``import`` finds; a distribution without a name or
    version (broken metadata) is skipped."""
    if distributions is None:
        distributions = importlib.metadata.distributions()
    out: Dict[str, str] = {}
    seen = set()
    for dist in distributions:
        try:
            name, version = dist.metadata["Name"], dist.version
        except Exception:  # noqa: BLE001 - unreadable metadata: nothing pip could compare either
            continue
        if not name or not version or _canonical(name) in seen:
            continue
        seen.add(_canonical(name))
        out[str(name).strip()] = str(version).strip()
    return out


def constraint_lines(installed: Dict[str, str], provided: Optional[Dict[str, Optional[str]]] = None) -> List[str]:
    """One constraint per installed distribution, pinned to its installed version (``name==version``,
    or ``name===version`` for a version that is not PEP 440); a package ``provided`` without pip
    metadata (version ``""``: Slicer's VTK) gets ``name<0``; a provided package absent from
    ``installed`` is pinned too. :data:`NOT_CONSTRAINED` (medsam3d) is left out. Sorted by name."""
    pins: Dict[str, str] = {}
    for name, version in (installed or {}).items():
        if _canonical(name) in {_canonical(n) for n in NOT_CONSTRAINED}:
            continue
        operator = "==" if _PEP440.match(version) else "==="
        pins.setdefault(_canonical(name), f"{name}{operator}{version}")
    for name, version in (provided or {}).items():
        if version is None or _canonical(name) in pins:
            continue
        pins[_canonical(name)] = f"{name}=={version}" if version else f"{name}<0"
    return [pins[key] for key in sorted(pins)]


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

    def notable_constraints(self) -> List[str]:
        """The constraints on :data:`NOTABLE` packages, in that order."""
        by_name = {_canonical(requirement_name(c)): c for c in self.constraints}
        return [by_name[_canonical(n)] for n in NOTABLE if _canonical(n) in by_name]

    def describe(self) -> str:
        kept = ", ".join(f"{k} {v or '(Slicer build)'}" for k, v in self.kept.items()) or "none"
        notable = self.notable_constraints()
        others = len(self.constraints) - len(notable)
        return (f"Install medsam3d into Slicer's Python from\n  {self.source}\n\n"
                f"and its dependencies ({len(self.dependencies)} packages from PyPI, several GB with torch):\n  "
                + ", ".join(requirement_name(r) for r in self.dependencies)
                + f"\n\nSlicer's own packages are kept as they are: {kept}.\n"
                f"pip may only add packages: all {len(self.constraints)} packages installed in Slicer's Python "
                f"are pinned to their installed versions ({', '.join(notable) or 'none of the usual ones'}"
                + (f" and {others} more" if others else "") + "); if a dependency needs another version of one of "
                "them, pip stops with a conflict and changes nothing.\n"
                "This modifies Slicer's Python environment; a restart of Slicer may be needed.")


def install_plan(source: str, provided: Optional[Dict[str, Optional[str]]] = None,
                 requirements: Optional[List[str]] = None, installed: Optional[Dict[str, str]] = None) -> InstallPlan:
    """The two pip steps for ``source`` (see the module docstring). ``provided`` defaults to
    :func:`provided_versions` of the running Python, ``requirements`` to medsam3d's own,
    ``installed`` (every distribution -> version, pinned by the constraints) to
    :func:`installed_versions`."""
    provided = provided_versions() if provided is None else provided
    requirements = medsam3d_requirements(source) if requirements is None else requirements
    installed = installed_versions() if installed is None else installed
    present = {_canonical(name): (name, version) for name, version in provided.items() if version is not None}
    dependencies = [r for r in requirements if _canonical(requirement_name(r)) not in present]
    kept = {name: version for name, version in present.values()}
    return InstallPlan(os.path.expanduser(str(source)), dependencies, constraint_lines(installed, provided), kept)


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
    # read again after PyTorchUtils: the torch it installed is pinned too
    importlib.invalidate_caches()
    plan.constraints = constraint_lines(installed_versions(), provided_versions())
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
                if plan.dependencies:
                    slicer.util.pip_install(["-c", constraints, *plan.dependencies])
        except Exception as exc:  # CalledProcessError and friends: pip said why in its log
            raise InstallError(f"pip could not install medsam3d ({exc}); see the Python console for pip's "
                               "message (a conflict with a package Slicer has, pinned by the constraints, is "
                               "reported there)") from exc
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
