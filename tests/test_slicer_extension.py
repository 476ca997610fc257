"""The 3D Slicer extension (``slicer_extension/``) without Slicer.

* its structure, read with ``ast`` and XML parsers (Slicer is never imported): the module's
  classes, the self-test's test methods, the parameter node's fields and the ``.ui`` widgets
  bound to them, every file the CMake lists name, the icons, ``requirements.txt``;
* its import hygiene: nothing installed and no torch or medsam3d imported when the module is
  imported (top-level statements), the vendored HTTP client in the standard library only;
* the parts that run outside Slicer: the install plan (medsam3d into Slicer's Python, every
  installed package pinned), the ROI-to-voxel-box rule against medsam3d's own, the
  in-process backend on the self-test's phantom, the client against a real ``medsam3d
  serve`` over loopback and against plain HTTP servers (redirects, the token over ``http://``).

The Widget's and Logic's Qt code runs only inside Slicer: its self-test (``MedSAM3DTest``) is
run there; faking Slicer here would test the fake.

The MRML side (the bridge against Slicer's real classes) is ``tests/test_slicer_bridge.py``.
"""

from __future__ import annotations

import ast
import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXT = REPO / "slicer_extension"
MODULE = EXT / "MedSAM3D"
LIB = MODULE / "MedSAM3DLib"
SCRIPT = MODULE / "MedSAM3D.py"
UI = MODULE / "Resources" / "UI" / "MedSAM3D.ui"

sys.path.insert(0, str(MODULE))
from MedSAM3DLib import backends, bridge, client, install, phantom  # noqa: E402


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def base_names(cls: ast.ClassDef) -> list[str]:
    return [ast.unparse(b) for b in cls.bases]


def parameter_fields() -> dict[str, str]:
    cls = classes(parse(SCRIPT))["MedSAM3DParameterNode"]
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


# ---------------------------------------------------------------------- the module's structure
def test_module_classes():
    found = classes(parse(SCRIPT))
    expected = {"MedSAM3D": "ScriptedLoadableModule", "MedSAM3DWidget": "ScriptedLoadableModuleWidget",
                "MedSAM3DLogic": "ScriptedLoadableModuleLogic", "MedSAM3DTest": "ScriptedLoadableModuleTest"}
    for name, base in expected.items():
        assert name in found, f"{SCRIPT.name} has no class {name}"
        assert base in base_names(found[name]), f"{name} does not derive from {base}"
    assert "VTKObservationMixin" in base_names(found["MedSAM3DWidget"])
    decorators = [ast.unparse(d) for d in found["MedSAM3DParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    methods = {f.name for f in found["MedSAM3DWidget"].body if isinstance(f, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "onApplyButton", "onRefineButton", "onCancelButton"} <= methods
    logic = {f.name for f in found["MedSAM3DLogic"].body if isinstance(f, ast.FunctionDef)}
    assert {"getParameterNode", "startSegment", "startRefine", "applyOutcome", "process", "close"} <= logic


def test_self_test_has_test_methods():
    """Slicer's runner finds the class by name and collects its test_* methods: a class without
    any would pass vacuously (the failure mode of extensions whose CTest runs zero tests)."""
    test = classes(parse(SCRIPT))["MedSAM3DTest"]
    methods = {f.name for f in test.body if isinstance(f, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= methods
    tests = sorted(m for m in methods if m.startswith("test_"))
    assert tests == ["test_MedSAM3DBridge", "test_MedSAM3DInProcess", "test_MedSAM3DServer"]
    run_test = next(f for f in test.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    assert set(tests) <= {n.attr for n in ast.walk(run_test) if isinstance(n, ast.Attribute)}, \
        "runTest does not run every test method"


def test_parameter_node_fields():
    fields = parameter_fields()
    assert fields == {
        "inputVolume": "vtkMRMLScalarVolumeNode", "outputSegmentation": "vtkMRMLSegmentationNode",
        "outputTable": "vtkMRMLTableNode", "mode": "Annotated[str, Choice(MODES)]",
        "model": "Annotated[str, Choice(MODELS)]", "device": "Annotated[str, Choice(DEVICES)]",
        "fast": "bool", "showSurface": "bool",
    }


def _cmake_list(text: str, variable: str, module_name: str) -> list[str]:
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", module_name) for line in body.splitlines() if line.strip()]


def test_cmake_lists_name_existing_files():
    ext = (EXT / "CMakeLists.txt").read_text()
    assert re.search(r"project\(MedSAM3D\)", ext)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_DEPENDS"):
        assert f"set({var} " in ext, f"the extension's CMakeLists.txt does not set {var}"
    for include in ("${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}", "${Slicer_USE_FILE}"):
        assert include in ext
    for sub in re.findall(r"add_subdirectory\((\w+)\)", ext):
        assert (EXT / sub / "CMakeLists.txt").is_file(), sub

    module = (MODULE / "CMakeLists.txt").read_text()
    name = re.search(r"set\(MODULE_NAME (\w+)\)", module).group(1)
    assert name == "MedSAM3D"
    scripts = _cmake_list(module, "MODULE_PYTHON_SCRIPTS", name)
    resources = _cmake_list(module, "MODULE_PYTHON_RESOURCES", name)
    for listed in scripts + resources:
        assert (MODULE / listed).is_file(), f"CMakeLists.txt lists {listed}, which does not exist"
    # files left out of the list are silently missing from the packaged extension
    on_disk = {f"MedSAM3DLib/{p.name}" for p in LIB.glob("*.py")} | {"MedSAM3D.py"}
    assert on_disk == set(scripts)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    assert "WITH_GENERIC_TESTS" in module
    for sub in re.findall(r"add_subdirectory\((\w+)\)", module):
        assert (MODULE / sub / "CMakeLists.txt").is_file()
    for sub in re.findall(r"add_subdirectory\((\w+)\)", (MODULE / "Testing" / "CMakeLists.txt").read_text()):
        assert (MODULE / "Testing" / sub / "CMakeLists.txt").is_file()


def test_icons():
    from PIL import Image

    with Image.open(EXT / "MedSAM3D.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
    with Image.open(MODULE / "Resources" / "Icons" / "MedSAM3D.png") as icon:
        assert icon.format == "PNG"


def test_requirements_file():
    from packaging.requirements import Requirement

    from MedSAM3DLib import install

    text = (MODULE / "Resources" / "requirements.txt").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    requirements = [Requirement(line) for line in lines]
    assert [str(r) for r in requirements] == [str(Requirement(install.MEDSAM3D_REQUIREMENT))]


# ---------------------------------------------------------------------- the .ui file
def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_ui_parses_with_the_expected_widgets():
    root = ET.parse(UI).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MedSAM3D"
    widgets = {name: w.get("class") for name, w in ui_widgets().items()}
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox", "roiSelector": "qMRMLCheckableNodeComboBox",
        "objectNameLineEdit": "QLineEdit", "addRoiButton": "QPushButton", "modeComboBox": "QComboBox",
        "modelComboBox": "QComboBox", "deviceComboBox": "QComboBox", "checkpointPathLineEdit": "ctkPathLineEdit",
        "medsam3dSourcePathLineEdit": "ctkPathLineEdit", "serverUrlLineEdit": "QLineEdit",
        "serverTokenLineEdit": "QLineEdit", "checkServerButton": "QPushButton", "fastCheckBox": "QCheckBox",
        "allowInsecureHttpCheckBox": "QCheckBox",
        "outputSegmentationSelector": "qMRMLNodeComboBox", "outputTableSelector": "qMRMLNodeComboBox",
        "showSurfaceCheckBox": "QCheckBox", "applyButton": "QPushButton", "refineButton": "QPushButton",
        "cancelButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
        "resultsTableView": "qMRMLTableView", "inProcessGroupBox": "QGroupBox", "serverGroupBox": "QGroupBox",
    }
    for name, cls in expected.items():
        assert widgets.get(name) == cls, f"{UI.name}: expected {name} as {cls}, found {widgets.get(name)}"
    token = ui_widgets()["serverTokenLineEdit"]
    assert token.find("property[@name='echoMode']/enum").text == "QLineEdit::Password"
    insecure = ui_widgets()["allowInsecureHttpCheckBox"]  # opt-in, unticked, not bound to the scene
    assert insecure.find("property[@name='checked']/bool").text == "false"
    assert insecure.find("property[@name='SlicerParameterName']") is None
    # the node selectors get the scene
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert {n for n, c in widgets.items() if c.startswith("qMRML") and n != "MedSAM3D"} <= receivers
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    assert {c for c in widgets.values() if not c.startswith("Q")} <= custom


def test_ui_parameter_names_match_the_parameter_node():
    bound = {}
    for name, w in ui_widgets().items():
        p = w.find("property[@name='SlicerParameterName']")
        if p is not None:
            bound[p.findtext("string")] = name
    assert set(bound) == set(parameter_fields()), "every field bound to one widget, every binding to a field"
    # the Choice lists of the parameter node are the combo boxes' items
    source = SCRIPT.read_text()
    for field, constant in (("mode", "MODES"), ("model", "MODELS"), ("device", "DEVICES")):
        values = ast.literal_eval(re.search(rf"^{constant} = (\[.*\])$", source, re.M).group(1))
        items = [i.findtext("property/string") for i in ui_widgets()[bound[field]].findall("item")]
        assert items == values


def test_every_ui_widget_the_code_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", SCRIPT.read_text()))
    assert used and used <= set(ui_widgets()), sorted(used - set(ui_widgets()))


# ---------------------------------------------------------------------- import hygiene
HEAVY = {"torch", "medsam3d", "onnxruntime", "SimpleITK", "nibabel", "vtk", "numpy"}
INSTALLING = {"pip_install", "pip_ensure", "ensure_medsam3d", "installTorch", "install"}


def _top_level_statements(tree: ast.Module):
    """Statements run when the module is imported: the module body and class bodies (not functions)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from node.decorator_list  # decorators run at import, the body does not
            continue
        if isinstance(node, ast.ClassDef):
            yield from node.decorator_list + node.bases + node.keywords
            todo.extend(node.body)
            continue
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            todo.extend(getattr(node, "body", []) + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                todo.extend(handler.body)


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [node.module.split(".")[0]]
    return []


@pytest.mark.parametrize("path", [SCRIPT, *sorted(LIB.glob("*.py"))], ids=lambda p: p.name)
def test_nothing_heavy_imported_or_installed_at_import(path):
    tree = parse(path)
    for node in _top_level_statements(tree):
        names = set(_imported(node))
        allowed = {"numpy"} if path.name in ("bridge.py", "phantom.py") else set()  # Slicer ships numpy
        allowed |= {"vtk"} if path == SCRIPT else set()  # Slicer's own VTK, as every module imports it
        assert not names & (HEAVY - allowed), \
            f"{path.name}: top-level import of {names & HEAVY} (import it where it is needed)"
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            # decorators and base classes are fine; calls to installers are not
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in INSTALLING, f"{path.name}: '{ast.unparse(call)}' runs at import"


@pytest.mark.parametrize("name", ["client.py", "backends.py", "install.py"])
def test_vendored_code_is_standard_library_only(name):
    """The server mode's code imports nothing beyond Python's standard library (anywhere in the
    file for the client; backends and install import medsam3d/Slicer only inside functions)."""
    tree = parse(LIB / name)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    lazily = {"backends.py": {"medsam3d"}, "install.py": {"slicer", "PyTorchUtils"}, "client.py": set()}[name]
    for node in ast.walk(tree):
        for module in _imported(node):
            assert module in stdlib or module in lazily, f"{name} imports {module}"
    for node in tree.body:
        for module in _imported(node):
            assert module in stdlib, f"{name} imports {module} at its top level"


def test_library_imports_without_slicer_torch_or_medsam3d():
    """Import the module's library in a Python where slicer, qt, torch and medsam3d cannot be imported."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'slicer', 'qt', 'ctk', 'torch', 'medsam3d', 'SimpleITK', 'onnxruntime'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(MODULE)!r})\n"
        "import MedSAM3DLib.client, MedSAM3DLib.backends, MedSAM3DLib.install, MedSAM3DLib.phantom, MedSAM3DLib.bridge\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'medsam3d', 'slicer', 'vtk', 'vtkmodules'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- the install plan
def _fake_wheel(path: Path, requires: list[str]) -> Path:
    meta = "Metadata-Version: 2.1\nName: medsam3d\nVersion: 0.1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\nThe long description.\nRequires-Dist: not-a-header\n"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("medsam3d-0.1.0.dist-info/METADATA", meta)
        wheel.writestr("medsam3d/__init__.py", "")
    return path


SLICER_5_12 = {"numpy": "2.2.6", "vtk": "", "SimpleITK": "2.5.0"}  # Slicer's VTK: importable, no pip metadata
#: what a Slicer's Python has installed (pip metadata; its VTK has none)
SLICER_5_12_INSTALLED = {"numpy": "2.2.6", "SimpleITK": "2.5.0", "pydicom": "3.0.1", "Pillow": "11.2.1",
                         "requests": "2.32.3", "packaging": "25.0", "medsam3d": "0.0.9"}


def test_install_plan_from_the_source_folder_keeps_slicers_packages():
    plan = install.install_plan(str(REPO), provided=SLICER_5_12, installed=SLICER_5_12_INSTALLED)
    names = {install.requirement_name(r).lower() for r in plan.dependencies}
    assert "torch" in names and "nibabel" in names
    assert not names & {"numpy", "vtk", "simpleitk"}
    # every installed package pinned (medsam3d, the one being installed, left out), Slicer's VTK refused
    assert plan.constraints == ["numpy==2.2.6", "packaging==25.0", "Pillow==11.2.1", "pydicom==3.0.1",
                                "requests==2.32.3", "SimpleITK==2.5.0", "vtk<0"]
    assert plan.constraints_text().endswith("\n")
    text = plan.describe()
    assert str(REPO) in text and "numpy 2.2.6" in text and "vtk (Slicer build)" in text
    # the dialog says how many are pinned and names the notable ones
    assert "all 7 packages" in text
    for line in ("numpy==2.2.6", "vtk<0", "SimpleITK==2.5.0", "pydicom==3.0.1", "Pillow==11.2.1", "requests==2.32.3"):
        assert line in text
    # the requirements themselves are the project's
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert install.medsam3d_requirements(str(REPO)) == declared


def test_install_plan_from_a_wheel(tmp_path):
    wheel = _fake_wheel(tmp_path / "medsam3d-0.1.0-py3-none-any.whl",
                        ["numpy>=1.23", "vtk>=9.3", "SimpleITK>=2.2", "scipy>=1.9",
                         "segment-anything>=1.0; extra == \"sam\"", "simpleitk-extra; python_version >= '3.10'"])
    assert install.medsam3d_requirements(str(wheel)) == [
        "numpy>=1.23", "vtk>=9.3", "SimpleITK>=2.2", "scipy>=1.9", "simpleitk-extra; python_version >= '3.10'"]
    plan = install.install_plan(str(wheel), provided={"numpy": "1.26.4", "vtk": None, "SimpleITK": "2.4.1"},
                                installed={"numpy": "1.26.4", "SimpleITK": "2.4.1"})
    assert plan.dependencies == ["vtk>=9.3", "scipy>=1.9", "simpleitk-extra; python_version >= '3.10'"]
    assert plan.constraints == ["numpy==1.26.4", "SimpleITK==2.4.1"]  # absent VTK: nothing to protect


def test_install_refuses_what_is_not_medsam3d(tmp_path):
    with pytest.raises(install.InstallError, match="wheel"):
        install.medsam3d_requirements(str(tmp_path / "nothing.txt"))
    other = _fake_wheel(tmp_path / "other-1.0-py3-none-any.whl", [])
    with pytest.raises(install.InstallError, match="medsam3d wheel"):
        install.medsam3d_requirements(str(other))
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "pyproject.toml").write_text('[project]\nname = "other"\ndependencies = []\n')
    with pytest.raises(install.InstallError, match="medsam3d project"):
        install.medsam3d_requirements(str(tmp_path / "proj"))


def test_constraints_pin_every_distribution_of_this_python(tmp_path):
    """The constraints of the running Python (this venv stands in for Slicer's): one line per
    installed distribution, each satisfied by the installed version, and pip reads the file
    and keeps everything as it is (offline: --no-index --dry-run)."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists = {}
    for dist in importlib.metadata.distributions():
        dists.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    lines = install.constraint_lines(install.installed_versions(), install.provided_versions())
    by_name = {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}
    assert len(by_name) == len(lines)
    assert set(by_name) == set(dists) - {"medsam3d"}
    for name, requirement in by_name.items():
        assert requirement.specifier.contains(dists[name], prereleases=True), (requirement, dists[name])
    for notable in ("numpy", "scipy", "pillow", "requests", "pydicom", "simpleitk", "vtk"):
        assert notable in by_name, notable  # medsam3d's own dependencies: all here
    plan = install.install_plan(str(REPO))
    assert plan.constraints == lines and f"all {len(lines)} packages" in plan.describe()

    # pip reads the whole file, and the pins bite: a newer tqdm on offer (a local wheel) is taken without
    # the constraints and refused with them
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no pip in this Python")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(plan.constraints_text())
    offer = tmp_path / "wheels"
    offer.mkdir()
    with zipfile.ZipFile(offer / "tqdm-999.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tqdm-999.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tqdm\nVersion: 999.0\n")
        wheel.writestr("tqdm-999.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n")
        wheel.writestr("tqdm-999.0.dist-info/RECORD", "")
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(offer),
           "--disable-pip-version-check", "--upgrade"]
    free = subprocess.run(pip + ["tqdm"], capture_output=True, text=True, timeout=120)
    assert free.returncode == 0 and "Would install tqdm-999.0" in free.stdout, free.stdout + free.stderr
    kept = subprocess.run(pip + ["-c", str(constraints), "tqdm", "numpy", "scipy"], capture_output=True, text=True,
                          timeout=120)
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert "Would install" not in kept.stdout, kept.stdout
    conflict = subprocess.run(pip + ["-c", str(constraints), "tqdm>=999"], capture_output=True, text=True,
                              timeout=120)
    assert conflict.returncode != 0 and "tqdm" in conflict.stderr  # pip stops, loudly


def test_provided_versions_here():
    """In this Python (not Slicer's) numpy, vtk and SimpleITK are pip packages with versions."""
    import importlib.metadata

    got = install.provided_versions()
    assert got == {name: importlib.metadata.version(name) for name in ("numpy", "vtk", "SimpleITK")}


# ---------------------------------------------------------------------- ROI geometry against medsam3d
@pytest.mark.parametrize("seed", range(12))
def test_covering_voxel_box_matches_medsam3d(seed):
    """The bridge's voxel box of a ROI's corners is medsam3d's (box_ras / rotated markups ROIs)."""
    from conftest import make_volume

    from medsam3d.errors import PromptError
    from medsam3d.prompts.ras import box_from_ras_corners

    rng = np.random.default_rng(seed)
    codes = ["RAS", "LPS", "LAI", "PSR", "ILA", "RPI"][seed % 6]
    volume = make_volume(shape=(30, 26, 14), spacing=tuple(rng.uniform(0.5, 3.0, 3)), axcodes=codes,
                         oblique_deg=[0.0, 17.0, 33.0][seed % 3], seed=seed)
    centre = volume.index_to_ras(rng.uniform([2, 2, 1], [28, 24, 13]))
    half = rng.uniform(2, 15, 3)
    if seed % 4 == 0:
        half[2] = 0.0  # flat
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
    corners = centre + signs * half
    try:
        box, z_range = box_from_ras_corners(volume, corners)
    except PromptError as refused:
        if "outside" in str(refused):
            with pytest.raises(ValueError, match="outside"):
                bridge.covering_voxel_box(corners, volume.affine, volume.shape)
            return
        # a flat ROI between two slices' centres: medsam3d asks to enlarge it, the bridge takes the
        # nearest slice (the ROI was drawn on that slice; it becomes a 2D box there)
        assert "voxel centre" in str(refused)
        lo, hi = bridge.covering_voxel_box(corners, volume.affine, volume.shape)
        k = np.rint(volume.ras_to_index(centre)).astype(int)
        flat = lo == hi
        assert flat.any() and np.array_equal(lo[flat], k[flat])
        return
    lo, hi = bridge.covering_voxel_box(corners, volume.affine, volume.shape)
    assert [lo[0], lo[1], hi[0], hi[1]] == list(box.box)
    assert (lo[2], hi[2]) == tuple(z_range)


# ---------------------------------------------------------------------- the phantom and the in-process backend
def test_phantom_matches_its_analytic_volume():
    array, matrix, centre, size, analytic_ml = phantom.phantom()
    assert array.shape == phantom.SHAPE_IJK and array.dtype == np.float32
    voxel_ml = abs(np.linalg.det(matrix[:3, :3])) / 1000
    assert abs((array > 250).sum() * voxel_ml - analytic_ml) / analytic_ml < 0.03
    ijk = np.linalg.solve(matrix[:3, :3], centre - matrix[:3, 3])
    assert array[tuple(np.rint(ijk).astype(int))] > 250


def _phantom_prompts():
    array, matrix, centre, size, analytic_ml = phantom.phantom()
    prompts = {"version": 1, "objects": [{"name": "ellipsoid", "box_ras": [(centre - size / 2).tolist(),
                                                                            (centre + size / 2).tolist()]}]}
    return array, matrix, prompts, analytic_ml


def test_in_process_backend_segments_and_refines():
    """The in-process backend (a medsam3d Session) on the phantom, with a weight-free model."""
    from synthetic import ThresholdModel

    array, matrix, prompts, analytic_ml = _phantom_prompts()
    backend = backends.InProcessBackend()
    backend._model = ThresholdModel()  # instead of loading LiteMedSAM (the slow test below does)
    backend.open("phantom", array, matrix, {"source": "test"})
    progress = backends.Progress()
    outcome = backend.segment(prompts, {"fast": None}, progress)
    obj = outcome.record["objects"][0]
    assert obj["name"] == "ellipsoid" and abs(obj["volume_ml"] - analytic_ml) / analytic_ml < 0.15
    labels, affine, segments = outcome.labels
    assert labels.shape == array.shape and np.allclose(affine, matrix)
    assert segments[1]["name"] == "ellipsoid"
    assert obj["measurements"]["whole"]["max_diameter_3d_mm"] > 0
    assert progress.snapshot()[1] > 0
    rows = bridge.measurement_rows(outcome.record)
    assert rows[0]["volume_ml"] == obj["volume_ml"] and rows[0]["long_axis_mm"] > 0

    session = backend.session
    backend.open("phantom", array, matrix)  # the same volume: the same session
    assert backend.session is session
    refined = backend.refine("ellipsoid", 20, [30, 35, 66, 61], backends.Progress())
    boxes = refined.record["objects"][0]["boxes"]
    assert any(b.get("slice") == 20 and list(b.get("box")) == [30, 35, 66, 61] for b in boxes), boxes

    cancelled = backends.Progress()
    cancelled.cancel()
    with pytest.raises(backends.Cancelled):
        backend.segment(prompts, None, cancelled)
    with pytest.raises(ValueError, match="options among"):
        backend.segment(prompts, {"speed": 1}, backends.Progress())


def test_in_process_refine_runs_the_engine_once(monkeypatch):
    """A refine is one engine pass (the prompts refined without segmenting, then one run_case), and
    the session's prompts follow the finished runs only (not a failed or cancelled one)."""
    import medsam3d.pipeline
    from synthetic import ThresholdModel

    array, matrix, prompts, _ = _phantom_prompts()
    backend = backends.InProcessBackend()
    backend._model = ThresholdModel()
    backend.open("phantom", array, matrix)
    passes = []
    real = medsam3d.pipeline.segment
    monkeypatch.setattr(medsam3d.pipeline, "segment", lambda *a, **k: passes.append(1) or real(*a, **k))
    backend.segment(prompts, {"taper": 1.5}, backends.Progress())
    assert len(passes) == 1 and [o.name for o in backend.session.objects] == ["ellipsoid"]
    first = backend.session.objects

    outcome = backend.refine("ellipsoid", 20, [30, 35, 66, 61], backends.Progress())
    assert len(passes) == 2  # one more pass, not two
    boxes = backend.session.objects[0].boxes
    assert any(b.slice == 20 and tuple(b.box) == (30, 35, 66, 61) for b in boxes)
    assert len(boxes) == len(first[0].boxes) + 1
    resolved = outcome.record["prompts"]["resolved"][0]["boxes"]
    assert any(b.get("slice") == 20 and list(b["box"]) == [30, 35, 66, 61] for b in resolved)
    assert outcome.record["settings"]["taper"] == 1.5  # the segment's options are re-used
    labels = outcome.labels[0]
    assert int((labels == 1).sum()) == outcome.record["objects"][0]["voxels"]

    refined = backend.session.objects
    cancelled = backends.Progress()
    cancelled.cancel()
    with pytest.raises(backends.Cancelled):
        backend.refine("ellipsoid", 18, [30, 35, 66, 61], cancelled)
    assert backend.session.objects == refined  # a cancelled refine leaves the prompts as they were
    with pytest.raises(backends.Cancelled):
        backend.segment({"version": 1, "objects": [{"name": "other", "slice": 20, "box": [1, 1, 9, 9]}]}, None,
                        cancelled)
    assert backend.session.objects == refined and backend._options == {"taper": 1.5}
    from medsam3d.errors import PromptError

    with pytest.raises(PromptError, match="'ellipsoid'"):
        backend.refine("kidney", 20, [30, 35, 66, 61], backends.Progress())


@pytest.mark.slow
def test_in_process_litemedsam_on_the_phantom():
    """What the Slicer self-test checks in-process (test_MedSAM3DInProcess), with the real model:
    the ellipsoid's volume within 15 %."""
    array, matrix, prompts, analytic_ml = _phantom_prompts()
    backend = backends.InProcessBackend("litemedsam", "cpu")
    backend.open("phantom", array, matrix)
    obj = backend.segment(prompts, None, backends.Progress()).record["objects"][0]
    assert abs(obj["volume_ml"] - analytic_ml) / analytic_ml < 0.15, (obj["volume_ml"], analytic_ml)


# ---------------------------------------------------------------------- the client against a real server
def test_client_refuses_bad_input():
    with pytest.raises(client.ClientError, match="server URL"):
        client.Client("ftp://example.org")
    c = client.Client("127.0.0.1:9", token="secret")
    assert c.url == "http://127.0.0.1:9" and "secret" not in repr(c)
    with pytest.raises(client.ClientError, match="volume file name"):
        c.create_session(b"", "volume.mha")
    with pytest.raises(client.ConnectionFailed, match="could not reach"):
        c.health()  # port 9 (discard) is closed on loopback


@contextlib.contextmanager
def http_server(host, answer):
    """A real HTTP server (http.server in a thread) on ``host``; ``answer(handler)`` answers every
    request; yields ``(url, seen)``, ``seen`` the requests' (method, path, headers)."""
    import http.server

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _any(self):
            seen.append((self.command, self.path, dict(self.headers)))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            answer(self)

        do_GET = do_POST = do_DELETE = _any

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _json_answer(handler, status=200, body=b'{"status": "ok"}'):
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_client_does_not_follow_redirects_with_the_token(status):
    """A server that redirects (to another server, here a second local one) gets a Redirected
    error back; the token never reaches the redirect's target."""
    with http_server("127.0.0.1", _json_answer) as (target, target_seen):
        def redirect(handler):
            handler.send_response(status)
            handler.send_header("Location", target + handler.path)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with http_server("127.0.0.1", redirect) as (url, seen):
            c = client.Client(url, token=TOKEN)
            with pytest.raises(client.Redirected) as redirected:
                c.health()
            assert redirected.value.status == status and redirected.value.location == target + "/health"
            assert "does not follow redirects" in str(redirected.value) and TOKEN not in str(redirected.value)
            assert isinstance(redirected.value, client.ServerError)
            with pytest.raises(client.Redirected):
                c.segment("sid", {"version": 1, "objects": []})
            assert [m for m, _, _ in seen] == ["GET", "POST"]
            assert seen[0][2].get("Authorization") == f"Bearer {TOKEN}"
            assert target_seen == []  # nothing, and no token, went to the redirect's target
            # what the client guards against: urllib's default opener follows with the header
            import urllib.request

            plain = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            plain.open(urllib.request.Request(url + "/health", headers={"Authorization": "Bearer x"}), timeout=10)
            assert target_seen and target_seen[0][2].get("Authorization") == "Bearer x"


def _own_address():
    """A non-loopback IPv4 address of this machine (a UDP connect sends nothing), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_client_refuses_a_token_over_plain_http_beyond_this_machine(monkeypatch):
    """http:// with a token: loopback only, unless allowed explicitly; https:// and no token are fine."""
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("MEDSAM3D_TOKEN", raising=False)
    with pytest.raises(client.InsecureTransport, match="Allow insecure HTTP"):
        client.Client("http://192.0.2.1:8000", token=TOKEN)
    with pytest.raises(client.InsecureTransport):
        client.Client("gpu-host.example:8000", token=TOKEN)  # no scheme: http://
    monkeypatch.setenv("MEDSAM3D_TOKEN", TOKEN)  # the token from the environment counts too
    with pytest.raises(client.InsecureTransport):
        client.Client("http://192.0.2.1:8000")
    monkeypatch.delenv("MEDSAM3D_TOKEN")
    client.Client("https://192.0.2.1:8000", token=TOKEN)
    client.Client("http://192.0.2.1:8000")  # no token: nothing to leak
    for loopback in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://127.1.2.3:8"):
        client.Client(loopback, token=TOKEN)
    with pytest.raises(client.InsecureTransport):
        backends.ServerBackend("http://192.0.2.1:8000", TOKEN)
    backends.ServerBackend("http://192.0.2.1:8000", TOKEN, allow_insecure_http=True)

    address = _own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve on")
    with http_server(address, _json_answer) as (url, seen):
        with pytest.raises(client.InsecureTransport):
            client.Client(url, token=TOKEN).health()
        assert seen == []  # refused before anything was sent
        assert client.Client(url, token=TOKEN, allow_insecure_http=True).health() == {"status": "ok"}
        assert seen[0][2].get("Authorization") == f"Bearer {TOKEN}"  # the user's explicit choice


def _server_parts():
    try:
        import medsam3d.server as server
    except ImportError:
        pytest.skip("medsam3d.server is not there yet (issue 25's server is written concurrently)")
    try:
        import uvicorn
    except ImportError:
        pytest.skip("needs the server extra (fastapi, uvicorn)")
    return server, uvicorn


@contextlib.contextmanager
def serving(model, token):
    server, uvicorn = _server_parts()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = server.create_app(server.ServerSettings(port=port, token=token), model=model)
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        runner.should_exit = True
        thread.join(30)


TOKEN = "slicer-client-token-0123456789"


@pytest.fixture(scope="module")
def server_url():
    from synthetic import ThresholdModel

    class SlowThreshold(ThresholdModel):
        delay = 0.0

        def encode(self, images):
            time.sleep(self.delay)
            return super().encode(images)

    model = SlowThreshold()
    with serving(model, TOKEN) as url:
        yield url, model


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    import medsam3d as m3

    array, matrix, prompts, analytic_ml = _phantom_prompts()
    folder = tmp_path_factory.mktemp("phantom")
    volume = m3.Volume(array, matrix)
    m3.save(volume, folder / "phantom.nrrd")
    m3.save(volume, folder / "phantom.nii.gz")
    return folder, prompts, analytic_ml


def test_client_against_the_server(server_url, phantom_files, tmp_path):
    import medsam3d as m3

    url, _ = server_url
    folder, prompts, analytic_ml = phantom_files
    c = client.Client(url, TOKEN)
    health = c.health()
    assert health["status"] == "ok" and health["token_required"] is True

    with pytest.raises(client.ServerError) as denied:
        client.Client(url, "wrong-token").create_session_from_file(str(folder / "phantom.nrrd"))
    assert denied.value.status == 401 and denied.value.detail

    session = c.create_session_from_file(str(folder / "phantom.nrrd"))
    assert session["shape"] == list(phantom.SHAPE_IJK)
    np.testing.assert_allclose(session["affine"], _phantom_prompts()[1], atol=1e-5)
    sid = session["session_id"]
    assert c.session(sid)["session_id"] == sid

    seen = []
    job = c.segment(sid, prompts, options={"fast": False})
    final = c.wait(job, poll_s=0.05, on_progress=seen.append)
    assert final["state"] == "done" and final["kind"] == "segment" and seen
    record = c.record(job)
    obj = record["objects"][0]
    assert obj["name"] == "ellipsoid" and abs(obj["volume_ml"] - analytic_ml) / analytic_ml < 0.15
    (tmp_path / "labels.seg.nrrd").write_bytes(c.labels(job, "seg.nrrd"))
    labels = m3.load_labels(tmp_path / "labels.seg.nrrd")
    assert labels.shape == phantom.SHAPE_IJK and labels.segments[1]["name"] == "ellipsoid"
    assert int((labels.array == 1).sum()) == obj["voxels"]
    (tmp_path / "labels.nii.gz").write_bytes(c.labels(job, "nii.gz"))
    assert int((m3.load_labels(tmp_path / "labels.nii.gz").array == 1).sum()) == obj["voxels"]
    assert c.mesh(job, 1, "stl")[:80]

    refine = c.refine(sid, "ellipsoid", 20, [30, 35, 66, 61])
    events = list(c.events(refine, timeout=120))
    assert events[-1]["state"] == "done" and events[-1]["kind"] == "refine"
    boxes = c.record(refine)["objects"][0]["boxes"]
    assert any(b.get("slice") == 20 for b in boxes)

    with pytest.raises(client.ServerError) as missing:
        c.session("no-such-session")
    assert missing.value.status == 404
    c.delete_session(sid)
    with pytest.raises(client.ServerError):
        c.session(sid)


def test_client_cancels_a_job(server_url, phantom_files):
    url, model = server_url
    folder, prompts, _ = phantom_files
    c = client.Client(url, TOKEN)
    sid = c.create_session_from_file(str(folder / "phantom.nii.gz"))["session_id"]
    model.delay = 0.3
    try:
        job = c.segment(sid, prompts)
        with pytest.raises(client.JobCancelled):
            c.wait(job, poll_s=0.05, should_cancel=lambda: True)
        assert c.job(job)["state"] == "cancelled"
        with pytest.raises(client.ServerError) as unfinished:
            c.record(job)
        assert unfinished.value.status in (404, 409)
    finally:
        model.delay = 0.0
        c.delete_session(sid)


def test_server_backend_end_to_end(server_url, phantom_files):
    """What the module's Logic runs in server mode: upload once, segment, refine, close."""
    url, _ = server_url
    folder, prompts, analytic_ml = phantom_files
    backend = backends.ServerBackend(url, TOKEN, poll_s=0.05)
    backend.open("phantom", str(folder / "phantom.nrrd"))
    sid = backend.session_id
    backend.open("phantom", str(folder / "phantom.nrrd"))
    assert backend.session_id == sid  # not uploaded twice
    progress = backends.Progress()
    outcome = backend.segment(prompts, {"fast": True}, progress)
    assert outcome.labels is None and outcome.labels_seg_nrrd.startswith(b"NRRD")
    assert abs(outcome.record["objects"][0]["volume_ml"] - analytic_ml) / analytic_ml < 0.15
    refined = backend.refine("ellipsoid", 20, [30, 35, 66, 61], backends.Progress())
    assert refined.record["objects"][0]["name"] == "ellipsoid"
    backend.close()
    assert backend.session_id is None
    with pytest.raises(client.ServerError):
        backend.client.session(sid)
    with pytest.raises(RuntimeError, match="open session"):
        backend.segment(prompts, None, backends.Progress())
