"""Static wiring checks of the Slicer module (Slicer itself cannot run here).

The .ui, the module code, the parameter node and the CMake lists must agree; PTQLogic must stay
Slicer-free; MRML calls stay in a few named methods; the packaging lists every shipped file.
"""
from __future__ import annotations

import ast
import json
import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PTQSegmentation"
MODULE_PY = MODULE_DIR / "PTQSegmentation.py"
SELF_TEST_PY = MODULE_DIR / "PTQSegmentationLib" / "PTQSegmentationTest.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "PTQSegmentation.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "PTQSegmentation.png"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
SLICER_MODULES = {"slicer", "qt", "vtk", "ctk", "MRMLCorePython", "SampleData", "SegmentEditorEffects"}
HEAVY = {"torch", "monai", "onnx", "onnxruntime", "openvino", "modelopt", "tensorrt"}
# The only methods that may use ``slicer.`` (MRML, dialogs, pip); the self-test (its own file) is exempt.
MRML_ALLOWED = {
    "setup", "initializeParameterNode", "showError", "workDirectory", "onCheckDependencies", "ensureDependencies",
    "installDependencies", "volumeFromNode", "exportReferenceLabels", "createOrUpdateSegmentation",
}
INTERACTIVE = {"QPushButton", "QComboBox", "QSpinBox", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox",
               "ctkPathLineEdit", "QTableWidget", "QPlainTextEdit", "QProgressBar"}


def _ui_widgets() -> dict[str, tuple[str, str | None]]:
    """objectName -> (class, SlicerParameterName or None)."""
    widgets = {}
    for element in ET.parse(UI_FILE).getroot().iter("widget"):
        param = element.find("./property[@name='SlicerParameterName']/string")
        widgets[element.get("name")] = (element.get("class"), None if param is None else param.text)
    return widgets


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


def _ui_attributes(tree: ast.AST) -> set[str]:
    """Names used as ``self.ui.<name>``."""
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def _connected_widgets(tree: ast.AST) -> dict[str, str]:
    """``self.ui.<name>.connect("signal", ...)`` -> {name: signal}."""
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                and node.func.value.value.attr == "ui"):
            found[node.func.value.attr] = node.args[0].value
    return found


def _parameter_fields(tree: ast.Module) -> set[str]:
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PTQSegmentationParameterNode")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def _cmake_list(text: str, name: str) -> list[str]:
    match = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert match, f"set({name} ...) missing"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def test_ui_and_code_agree():
    widgets, tree = _ui_widgets(), _module_tree()
    used = _ui_attributes(tree)
    assert used - set(widgets) == set(), "self.ui names missing from the .ui"
    bound = {name for name, (_, param) in widgets.items() if param}
    unused = {n for n, (cls, _) in widgets.items() if cls in INTERACTIVE} - used - bound
    assert unused == set(), "interactive widgets neither used by the code nor bound to the parameter node"
    connected = _connected_widgets(tree)
    buttons = {n for n, (cls, _) in widgets.items() if cls == "QPushButton"}
    assert {b: connected.get(b) for b in buttons} == {b: "clicked(bool)" for b in buttons}
    assert connected["modelPathLineEdit"] == "currentPathChanged(QString)"
    assert {"quantizeButton", "segmentButton", "compareButton", "cancelButton", "progressBar", "statusLabel",
            "logTextEdit", "resultsTable"} <= used
    for section in ("inputsCollapsibleButton", "calibrationCollapsibleButton", "precisionCollapsibleButton",
                    "outputCollapsibleButton", "logCollapsibleButton"):
        assert widgets[section][0] == "ctkCollapsibleButton"


def test_parameter_node_bindings():
    widgets, tree = _ui_widgets(), _module_tree()
    fields = _parameter_fields(tree)
    params = {param for _, param in widgets.values() if param}
    assert params - fields == set(), "SlicerParameterName values that the parameter node lacks"
    assert fields - params == {"calibrationVolumes"}  # set from the checkable combo box in code
    assert "calibrationVolumes" in MODULE_PY.read_text()
    combos = {param: [i.text for i in ET.parse(UI_FILE).getroot().findall(f".//widget[@name='{name}']/item/property/string")]
              for name, (cls, param) in widgets.items() if cls == "QComboBox" and param}
    source = MODULE_PY.read_text()
    assert combos["precision"] == ["auto", "int8", "fp16", "fp32"] and combos["method"] == ["max", "entropy", "percentile"]
    assert combos["runtime"] == ["auto", "tensorrt", "openvino", "onnxruntime", "torch"]
    for choices in combos.values():  # Choice(...) annotations list the same values as the combo boxes
        assert all(f'"{c}"' in source for c in choices)


def _top_imports(tree: ast.Module) -> set[str]:
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    return top


@pytest.mark.parametrize("path", [MODULE_PY, SELF_TEST_PY], ids=["module", "self-test"])
def test_module_compiles_and_imports_only_what_slicer_provides(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "m.pyc"), doraise=True)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = _top_imports(tree)
    assert "PTQLogic" in top and {"slicer"} <= top
    assert top - SLICER_MODULES - set(sys.stdlib_module_names) - {"PTQLogic", "PTQSegmentationLib"} == set()
    everywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    everywhere |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert everywhere & HEAVY == set(), "the module must leave heavy work to the engine process"


def test_ptqlogic_never_imports_slicer():
    offenders = []
    for path in sorted((ROOT / "PTQLogic").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in SLICER_MODULES]
    assert offenders == []


def test_mrml_calls_only_in_allowed_methods():
    tree = _module_tree()
    offenders = []

    def visit(node: ast.AST, owner: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and owner is None else owner
            if (isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "slicer"
                    and name not in MRML_ALLOWED):
                offenders.append(f"{name or '<module>'}: slicer.{child.attr} (line {child.lineno})")
            visit(child, name)

    visit(tree, None)
    assert offenders == []
    assert len(MRML_ALLOWED) <= 10


def test_source_registers_a_self_test_that_quantizes_and_segments():
    """Reads the source and CMake lists only: the self-test itself runs inside Slicer. Slicer looks for
    ``PTQSegmentationTest`` in the module's file (which imports it from its own file), and takes every .py file
    next to PTQSegmentation.py for a module: the self-test lives in the PTQSegmentationLib package."""
    imported = [n for n in _module_tree().body if isinstance(n, ast.ImportFrom)
                and n.module == "PTQSegmentationLib.PTQSegmentationTest"]
    assert [a.name for n in imported for a in n.names] == ["PTQSegmentationTest"]
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["PTQSegmentation.py"]
    assert (SELF_TEST_PY.parent / "__init__.py").is_file()
    tree = ast.parse(SELF_TEST_PY.read_text(encoding="utf-8"))
    test_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PTQSegmentationTest")
    assert [b.id for b in test_cls.bases if isinstance(b, ast.Name)] == ["ScriptedLoadableModuleTest"]
    methods = {f.name: f for f in test_cls.body if isinstance(f, ast.FunctionDef)}
    tests = {name for name in methods if name.startswith("test_")}
    called = {n.func.attr for n in ast.walk(methods["runTest"]) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Attribute)}
    assert tests and tests <= called
    body = ast.unparse(methods["test_QuantizeSegmentCompare"])
    for needle in ("phantom_unet.json", "quantize_command", "segment_command", "'int8', True", "agreement_dice",
                   "Reference image geometry", "arrayFromVolume(inputNode) == before"):
        assert needle in body
    cmake = MODULE_CMAKE.read_text()
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", cmake, re.S)
    assert "WITH_GENERIC_TESTS" in cmake and "add_subdirectory(Testing)" in cmake
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text().strip() == "add_subdirectory(Python)"
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_cmake_lists_every_shipped_file():
    cmake = MODULE_CMAKE.read_text()
    scripts = {s.replace("${MODULE_NAME}", "PTQSegmentation") for s in _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")}
    resources = {s.replace("${MODULE_NAME}", "PTQSegmentation") for s in _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")}
    module_py = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert module_py - scripts == set()
    assert {UI_FILE.relative_to(MODULE_DIR).as_posix(), ICON.relative_to(MODULE_DIR).as_posix()} <= resources
    package = ROOT / "PTQLogic"
    logic_py = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    assert logic_py - set(_cmake_list(cmake, "PTQLOGIC_PYTHON_FILES")) == set(), "add new PTQLogic files to CMake"
    data = {p.relative_to(package).as_posix() for p in (package / "samples" / "data").glob("*") if p.is_file()}
    assert data - set(_cmake_list(cmake, "PTQLOGIC_DATA_FILES")) == set(), "add new PTQLogic/samples/data files to CMake"
    top = (ROOT / "CMakeLists.txt").read_text()
    for needle in ("EXTENSION_HOMEPAGE", 'EXTENSION_CATEGORY "Segmentation"', "EXTENSION_CONTRIBUTORS",
                   "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", 'EXTENSION_DEPENDS "NA"',
                   "find_package(Slicer REQUIRED)", "add_subdirectory(PTQSegmentation)",
                   "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert needle in top


def test_every_listed_file_exists():
    cmake = MODULE_CMAKE.read_text()
    listed = [MODULE_DIR / s.replace("${MODULE_NAME}", "PTQSegmentation")
              for s in _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS") + _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")]
    listed += [ROOT / "PTQLogic" / s for s in
               _cmake_list(cmake, "PTQLOGIC_PYTHON_FILES") + _cmake_list(cmake, "PTQLOGIC_DATA_FILES")]
    assert [str(p.relative_to(ROOT)) for p in listed if not p.is_file()] == []


def test_catalog_files():
    entry = json.loads((ROOT / "Resources" / "PTQSegmentation.json").read_text())
    assert {"$schema", "category", "scm_url", "scm_revision", "build_dependencies", "tier"} <= set(entry)
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == []
    catalog = json.loads((ROOT / "Resources" / "model_catalog.json").read_text())
    assert [m["name"] for m in catalog["models"]] == ["phantom_unet", "phantom_segresnet", "ct_unet"]
    from PTQLogic.core.spec import load_spec

    for model in catalog["models"]:
        spec_path = ROOT / model["spec"]
        if spec_path.is_file():  # shipped by the training step
            assert load_spec(spec_path).class_names == model["classes"]


def test_cmake_configures_with_a_stand_in_slicer(tmp_path):
    """Configure the extension against a minimal stand-in SlicerConfig.cmake: syntax, and PTQLogic lands next
    to the module in the layout the installed extension will have."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    fake = tmp_path / "fake-slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(f"""
set(Slicer_USE_FILE {fake}/use.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG {fake}/empty.cmake)
set(Slicer_EXTENSION_CPACK {fake}/empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
""")
    (fake / "empty.cmake").write_text("")
    (fake / "use.cmake").write_text("""
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    if(IS_ABSOLUTE ${file})
      file(RELATIVE_PATH rel ${CMAKE_CURRENT_BINARY_DIR} ${file})
      set(src ${file})
    else()
      set(rel ${file})
      set(src ${CMAKE_CURRENT_SOURCE_DIR}/${file})
    endif()
    if(NOT EXISTS ${src})
      message(FATAL_ERROR "missing ${src}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/shipped.txt "${rel}\\n")
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(T "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/tests.txt "${T_SCRIPT}\\n")
endmacro()
""")
    build = tmp_path / "build"
    done = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    shipped = set((build / "shipped.txt").read_text().split())
    assert {"PTQSegmentation.py", "PTQSegmentationLib/__init__.py", "PTQSegmentationLib/PTQSegmentationTest.py",
            "Resources/UI/PTQSegmentation.ui", "PTQLogic/__init__.py", "PTQLogic/slicer/support.py",
            "PTQLogic/engines/base.py"} <= shipped
    assert all(not s.startswith("..") for s in shipped)
    assert (build / "PTQSegmentation" / "PTQLogic" / "app" / "cli.py").read_bytes() == (ROOT / "PTQLogic" / "app" / "cli.py").read_bytes()
    data_dir = build / "lib/Slicer-5.8/qt-scripted-modules/PTQLogic/samples/data"
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(p.name for p in (ROOT / "PTQLogic/samples/data").iterdir())
    assert (build / "tests.txt").read_text().split() == ["PTQSegmentation.py"]


# ---------------------------------------------------------------- issue 10, items 1-5 (Slicer 5.6-5.10 behaviour)


def test_category_uses_the_core_modules_translation_context():
    """Item 5: translated like core modules, so the module joins Slicer's own Segmentation category."""
    cls = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == "PTQSegmentation")
    assignment = next(n for n in ast.walk(cls) if isinstance(n, ast.Assign)
                      and ast.unparse(n.targets[0]) == "self.parent.categories")
    assert ast.unparse(assignment.value) == "[translate('qSlicerAbstractCoreModule', 'Segmentation')]"


def test_tensorrt_optimization_level_is_an_advanced_option():
    from PTQLogic.engines.tensorrt_engine import DEFAULT_OPTIMIZATION_LEVEL
    from PTQLogic.slicer.process import segment_command

    spin = ET.parse(UI_FILE).getroot().find(".//widget[@name='trtOptLevelSpinBox']")
    values = {p.get("name"): p.find("./number").text for p in spin.findall("property") if p.find("./number") is not None}
    assert values == {"minimum": "0", "maximum": "5", "value": str(DEFAULT_OPTIMIZATION_LEVEL)}
    assert f"trtOptLevel: Annotated[int, WithinRange(0, 5)] = {DEFAULT_OPTIMIZATION_LEVEL}" in MODULE_PY.read_text()
    assert "trt_opt_level=params.trtOptLevel" in MODULE_PY.read_text()
    command = segment_command("python", "m", "in.nrrd", "out.nrrd", "auto", "int8", False, trt_opt_level=1)
    assert command[command.index("--trt-opt-level") + 1] == "1"
    from PTQLogic.app.cli import build_parser

    assert build_parser().parse_args(command[3:]).trt_opt_level == 1  # the CLI accepts what the module sends


def test_extensions_index_requirements():
    """Item 6: a LICENSE at the root (Apache-2.0, as pyproject says), the screenshot the CMake metadata
    points to exists in the repository, and the README shows it and names the licence."""
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text.splitlines()) > 190
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    top = (ROOT / "CMakeLists.txt").read_text()
    url = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', top).group(1)
    relative = url.split("/main/", 1)[1]
    screenshot = ROOT / relative
    assert screenshot.is_file() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(screenshot.read_bytes()[16:20], "big"), int.from_bytes(screenshot.read_bytes()[20:24], "big")
    assert width >= 300 and height >= 500
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"]({relative})" in readme and "render_screenshot.py" in readme
    assert "## License" in readme and "Apache License 2.0" in readme
    icon = re.search(r'set\(EXTENSION_ICONURL "([^"]+)"\)', top).group(1).split("/main/", 1)[1]
    assert (ROOT / icon).is_file()


def test_screenshot_renderer_uses_the_real_ui():
    """The screenshot's renderer loads the module's own .ui; CTK/MRML classes become their Qt bases."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from render_screenshot import SUBSTITUTES, qt_only_ui
    finally:
        sys.path.remove(str(ROOT / "docs"))
    converted = ET.fromstring(qt_only_ui(UI_FILE.read_text(encoding="utf-8")))
    classes = {w.get("class") for w in converted.iter("widget")}
    assert classes.isdisjoint(SUBSTITUTES) and {"QGroupBox", "QLineEdit", "QComboBox", "QPushButton"} <= classes
    assert {w.get("name") for w in converted.iter("widget")} == set(_ui_widgets())  # nothing dropped
    custom = {c.find("class").text for c in ET.parse(UI_FILE).getroot().iter("customwidget")}
    assert custom <= set(SUBSTITUTES)


def test_cpu_bf16_is_an_advanced_option_the_cli_accepts():
    from PTQLogic.app.cli import build_parser
    from PTQLogic.slicer.process import segment_command

    box = ET.parse(UI_FILE).getroot().find(".//widget[@name='cpuBf16CheckBox']")
    assert box is not None and box.get("class") == "QCheckBox"
    assert next(p for p in box.findall("property") if p.get("name") == "SlicerParameterName").find("string").text \
        == "cpuBf16"
    assert "cpuBf16: bool = False" in MODULE_PY.read_text() and "cpu_bf16=params.cpuBf16" in MODULE_PY.read_text()
    command = segment_command("python", "m", "in.nrrd", "out.nrrd", "auto", "int8", False, cpu_bf16=True)
    assert build_parser().parse_args(command[3:]).cpu_float == "bf16"
    assert "--cpu-float" not in segment_command("python", "m", "in.nrrd", "out.nrrd", "auto", "int8", False)


def test_fp32_windows_is_an_advanced_option_passed_only_where_it_applies(tmp_path):
    """--fp32-windows: a spin box saved in the parameter node, passed to segment for nnU-Net models at INT8 or
    auto precision (other models and precisions would refuse it), shown in the results table."""
    import json

    from PTQLogic.app.cli import build_parser
    from PTQLogic.slicer.process import segment_command
    from PTQLogic.slicer.support import fp32_windows_for, results_rows

    box = ET.parse(UI_FILE).getroot().find(".//widget[@name='fp32WindowsSpinBox']")
    assert box is not None and box.get("class") == "QDoubleSpinBox"
    assert next(p for p in box.findall("property") if p.get("name") == "SlicerParameterName").find("string").text \
        == "fp32Windows"
    source = MODULE_PY.read_text()
    assert "fp32Windows: Annotated[float, WithinRange(0.0, 1.0)] = 0.0" in source
    assert "fp32_windows=params.fp32Windows" in source  # segment_command passes it only where it applies
    parts = tmp_path / "parts.json"
    parts.write_text(json.dumps({"parts": ["a", "b"]}))
    monai_folder = tmp_path / "unet"
    monai_folder.mkdir()
    (monai_folder / "spec.json").write_text("{}")
    for model in (monai_folder, ""):
        assert "--fp32-windows" not in segment_command("python", model, "in.nrrd", "out.nrrd", "auto", "int8", False,
                                                       fp32_windows=0.25)
    assert "--fp32-windows" not in segment_command("python", parts, "in.nrrd", "out.nrrd", "auto", "fp32", False,
                                                   fp32_windows=0.25)
    assert fp32_windows_for(parts, "int8", 0.25) == 0.25 and fp32_windows_for(parts, "auto", 0.25) == 0.25
    assert fp32_windows_for(parts, "fp32", 0.25) == 0.0 and fp32_windows_for(parts, "int8", 0.0) == 0.0
    assert fp32_windows_for(monai_folder, "int8", 0.25) == 0.0 and fp32_windows_for("", "int8", 0.25) == 0.0
    command = segment_command("python", parts, "in.nrrd", "out.nrrd", "auto", "int8", False, fp32_windows=0.25)
    assert build_parser().parse_args(command[3:]).fp32_windows == 0.25
    assert "--fp32-windows" not in segment_command("python", parts, "in.nrrd", "out.nrrd", "auto", "int8", False)
    rows = dict(results_rows({"fp32_windows": {"windows": 9, "of": 135}, "seconds": 50.0}))
    assert rows["Windows from FP32"] == "9 of 135 (where INT8 was least sure)"


def test_equalize_is_an_opt_in_checkbox_passed_for_nnunet_folders_only():
    from PTQLogic.app.cli import build_parser
    from PTQLogic.slicer.process import quantize_command

    box = ET.parse(UI_FILE).getroot().find(".//widget[@name='calibrationCollapsibleButton']"
                                           "//widget[@name='equalizeChannelsCheckBox']")
    assert box is not None and box.get("class") == "QCheckBox"
    values = {p.get("name"): p.find("string").text for p in box.findall("property")}
    assert values["SlicerParameterName"] == "equalizeChannels" and "same in FP32" in values["toolTip"]
    source = MODULE_PY.read_text()
    assert "equalizeChannels: bool = False" in source
    assert 'equalize=params.equalizeChannels and source.kind == "nnunet"' in source
    command = quantize_command("python", "folder", ["c.nii.gz"], "out", 8, "entropy", equalize=True)
    assert build_parser().parse_args(command[3:]).equalize is True
    assert "--equalize" not in quantize_command("python", "folder", ["c.nii.gz"], "out", 8, "entropy")


def test_percentile_is_a_calibration_option_the_cli_accepts():
    """Issue 22: the method combo offers percentile; its spin box starts disabled (entropy is the default), uses
    PTQLogic's default percentile, is saved in the parameter node and reaches quantize as --percentile."""
    from PTQLogic.app.cli import build_parser
    from PTQLogic.quantization.interface import DEFAULT_METHOD
    from PTQLogic.quantization.percentile import DEFAULT_PERCENTILE
    from PTQLogic.slicer.process import quantize_command

    spin = ET.parse(UI_FILE).getroot().find(".//widget[@name='percentileSpinBox']")
    assert spin is not None and spin.get("class") == "QDoubleSpinBox"
    values = {p.get("name"): p[0].text for p in spin.findall("property")}
    assert (float(values["minimum"]), float(values["maximum"]), float(values["value"])) == (99.0, 99.9999,
                                                                                          DEFAULT_PERCENTILE)
    assert values["decimals"] == "4" and values["enabled"] == "false" and values["SlicerParameterName"] == "percentile"
    assert "histogram" in values["toolTip"] and "calibration_methods_epyc2_avx2.md" in values["toolTip"]
    assert "Entropy stays the default" in values["toolTip"] and DEFAULT_METHOD == "entropy"
    source = MODULE_PY.read_text()
    assert f"percentile: Annotated[float, WithinRange(99.0, 99.9999)] = {DEFAULT_PERCENTILE}" in source
    assert "percentile=params.percentile" in source
    assert _connected_widgets(_module_tree())["methodComboBox"] == "currentTextChanged(QString)"
    command = quantize_command("python", "spec.json", ["c.nrrd"], "out", 4, "percentile", percentile=99.9999)
    assert command[command.index("--method"):command.index("--method") + 4] == ["--method", "percentile",
                                                                               "--percentile", "99.9999"]
    args = build_parser().parse_args(command[3:])
    assert (args.method, args.percentile) == ("percentile", 99.9999)
    for method in ("max", "entropy"):
        assert "--percentile" not in quantize_command("python", "s", ["c"], "o", 4, method, percentile=99.9)


def test_bias_correction_is_an_opt_in_checkbox_the_cli_accepts():
    """The Calibration section's "Bias correction" box: unchecked (off, as the CLI), saved in the parameter node,
    its tooltip says what it does, why it is off and what it costs, and it reaches quantize as --bias-correction."""
    from PTQLogic.app.cli import build_parser
    from PTQLogic.slicer.process import quantize_command

    root = ET.parse(UI_FILE).getroot()
    box = root.find(".//widget[@name='calibrationCollapsibleButton']//widget[@name='biasCorrectionCheckBox']")
    assert box is not None and box.get("class") == "QCheckBox"
    values = {p.get("name"): p[0].text for p in box.findall("property")}
    assert values["text"] == "Bias correction" and values["SlicerParameterName"] == "biasCorrection"
    assert values.get("checked", "false") == "false"
    for needle in ("bias", "FP32", "Off by default", "one of three", "costs", "docs/fidelity.md"):
        assert needle in values["toolTip"], needle
    source = MODULE_PY.read_text()
    assert "biasCorrection: bool = False" in source and "bias_correction=params.biasCorrection" in source
    assert "biasCorrection" in _parameter_fields(_module_tree())
    command = quantize_command("python", "spec.json", ["c.nrrd"], "out", 4, "entropy", bias_correction=True)
    assert build_parser().parse_args(command[3:]).bias_correction is True
    assert build_parser().parse_args(quantize_command("python", "s", ["c"], "o", 4, "entropy")[3:]).bias_correction \
        is False


def test_keep_fp32_on_miss_is_an_opt_in_checkbox_that_reaches_quantize():
    """The Calibration section's nnU-Net box: unchecked (quantizing fails on a miss, as the CLI), saved in the
    parameter node, its tooltip says what it does, and it reaches quantize as --on-miss fp32 (with the guard on)."""
    from PTQLogic.app.cli import build_parser
    from PTQLogic.slicer.process import quantize_command

    root = ET.parse(UI_FILE).getroot()
    box = root.find(".//widget[@name='calibrationCollapsibleButton']//widget[@name='keepFp32OnMissCheckBox']")
    assert box is not None and box.get("class") == "QCheckBox"
    values = {p.get("name"): p[0].text for p in box.findall("property")}
    assert values["SlicerParameterName"] == "keepFp32OnMiss" and values.get("checked", "false") == "false"
    for needle in ("nnU-Net", "TotalSegmentator", "FP32", "Segment then says", "Off: quantizing fails"):
        assert needle in values["toolTip"], needle
    source = MODULE_PY.read_text()
    assert "keepFp32OnMiss: bool = False" in source and 'on_miss="fp32" if params.keepFp32OnMiss' in source
    assert "keepFp32OnMiss" in _parameter_fields(_module_tree())
    command = quantize_command("python", "nnunet_folder", ["c.nrrd"], "out", 4, "entropy", on_miss="fp32")
    assert build_parser().parse_args(command[3:]).on_miss == "fp32"
    assert build_parser().parse_args(quantize_command("python", "s", ["c"], "o", 4, "entropy")[3:]).on_miss == "fail"
