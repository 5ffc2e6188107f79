"""Methods of the Slicer module run against small stand-ins of the Slicer calls they make (Slicer itself
cannot run here): the parameter node's GUI connection, the model path dialog, and the segmentation-node update
that must never lose a node's segments, and the command line Quantize builds from the panel."""
from __future__ import annotations

import ast
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "PTQSegmentation"
MODULE_PY = MODULE_DIR / "PTQSegmentation.py"
SELF_TEST_PY = MODULE_DIR / "PTQSegmentationLib" / "PTQSegmentationTest.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "PTQSegmentation.ui"


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


def _method(class_name: str, name: str, **globals_):
    """One method of the module, compiled alone with the given globals (Slicer cannot be imported here)."""
    cls = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == class_name)
    function = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == name)
    namespace = dict(globals_)
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(MODULE_PY), "exec"), namespace)
    return namespace[name]


class _ParameterNodeStandIn:
    """The two calls of Slicer's parameterNodeWrapper the widget uses; ``tags`` are what connectGui returns
    (5.10 counts from 0 per wrapper; 5.6/5.8 return None)."""

    def __init__(self, tags):
        self.tags, self.connected, self.calls = list(tags), 0, []
        self.modelPath, self.method = "", "percentile"

    def connectGui(self, gui):
        self.connected += 1
        self.calls.append("connect")
        return self.tags.pop(0)

    def disconnectGui(self, tag):
        self.connected -= 1
        self.calls.append(("disconnect", tag))


@pytest.mark.parametrize("tags", [[0, 1, 2, 3], [None] * 4], ids=["slicer-5.10", "slicer-5.6-5.8"])
def test_parameter_node_gui_is_disconnected_on_exit_and_reconnect(tags):
    """Item 1: a falsy tag (0 or None) must still be disconnected, so enter() never stacks connections."""
    methods = []
    widget = types.SimpleNamespace(_parameterNode=None, _parameterNodeGuiTag=None, ui=object(),
                                   onModelPathChanged=lambda path: None, onMethodChanged=methods.append)
    setParameterNode = _method("PTQSegmentationWidget", "setParameterNode")
    exit_ = _method("PTQSegmentationWidget", "exit")
    node = _ParameterNodeStandIn(tags)
    for _ in range(3):  # enter() three times, as Slicer does when the user comes back to the module
        setParameterNode(widget, node)
        assert node.connected == 1
    exit_(widget)
    assert node.connected == 0 and widget._parameterNodeGuiTag is None
    setParameterNode(widget, node)
    setParameterNode(widget, None)
    assert node.connected == 0
    assert methods == ["percentile"] * 4  # the percentile box follows the saved method on every connect


def test_model_path_can_browse_folders_and_files():
    """Item 3: ctkPathLineEdit's button opens a file dialog whenever Files is set; a Folder button picks folders."""
    root = ET.parse(UI_FILE).getroot()
    layout = next(lay for lay in root.iter("layout") if lay.find("./item/widget[@name='modelPathLineEdit']") is not None)
    assert {w.get("name") for w in layout.findall("./item/widget")} == {"modelPathLineEdit", "modelFolderButton"}
    filters = root.find(".//widget[@name='modelPathLineEdit']/property[@name='filters']/set").text
    assert "ctkPathLineEdit::Files" in filters  # files stay pickable with the line edit's own button
    asked = []

    def get_existing_directory(parent, title, start):
        asked.append(start)
        return "/data/nnUNet_results/Dataset001"

    qt_standin = types.SimpleNamespace(QFileDialog=types.SimpleNamespace(getExistingDirectory=get_existing_directory))
    browse = _method("PTQSegmentationWidget", "onBrowseModelFolder", qt=qt_standin, _=lambda text: text)
    widget = types.SimpleNamespace(parent=None, ui=types.SimpleNamespace(
        modelPathLineEdit=types.SimpleNamespace(currentPath="/data/old.json")))
    browse(widget)
    assert asked == ["/data/old.json"] and widget.ui.modelPathLineEdit.currentPath == "/data/nnUNet_results/Dataset001"
    qt_standin.QFileDialog.getExistingDirectory = lambda parent, title, start: ""  # dialog cancelled
    browse(widget)
    assert widget.ui.modelPathLineEdit.currentPath == "/data/nnUNet_results/Dataset001"


def _segmentation_node_standin(segments=None, name=""):
    """A vtkMRMLSegmentationNode with the calls createOrUpdateSegmentation makes; segments: id -> (name, voxels)."""
    seg = types.SimpleNamespace(segments=dict(segments or {}), source="Closed surface")

    def remove_all():
        assert seg.source == "Binary labelmap", "cleared with a closed-surface source: importing would fail"
        seg.segments.clear()

    def copy(other, segment_id):
        seg.segments[segment_id] = other.segments[segment_id]
        return True

    seg.__dict__.update(AddEmptySegment=lambda sid, label, color: seg.segments.setdefault(sid, (label, 0)) and sid,
                        GetSegment=lambda sid: types.SimpleNamespace(SetTerminology=lambda entry: None),
                        SetSourceRepresentationName=lambda source: setattr(seg, "source", source),
                        RemoveAllSegments=remove_all, GetNumberOfSegments=lambda: len(seg.segments),
                        GetNthSegmentID=lambda i: list(seg.segments)[i], CopySegmentFromSegmentation=copy)
    node = types.SimpleNamespace(segmentation=seg, name=name, GetSegmentation=lambda: seg, StartModify=lambda: 0)
    for call in ("SetHideFromEditors", "SetReferenceImageGeometryParameterFromVolumeNode", "EndModify",
                 "CreateDefaultDisplayNodes", "CreateClosedSurfaceRepresentation"):
        setattr(node, call, lambda *args: None)
    return node


def _scene_standin(fail_at_segment=None):
    """slicer with a scene of stand-in nodes; filling segment ``fail_at_segment`` raises (e.g. out of memory)."""
    nodes = []

    def add(cls, name):
        nodes.append(_segmentation_node_standin(name=name))
        return nodes[-1]

    def fill(array, node, segment_id, reference):
        if segment_id == fail_at_segment:
            raise MemoryError("no memory for this segment")
        name, _ = node.segmentation.segments[segment_id]
        node.segmentation.segments[segment_id] = (name, int(array.sum()))

    scene = types.SimpleNamespace(AddNewNodeByClass=add, RemoveNode=nodes.remove, GenerateUniqueName=str)
    converter = types.SimpleNamespace(GetSegmentationBinaryLabelmapRepresentationName=lambda: "Binary labelmap")
    return nodes, types.SimpleNamespace(mrmlScene=scene, vtkSegmentationConverter=converter,
                                        util=types.SimpleNamespace(updateSegmentBinaryLabelmapFromArray=fill))


@pytest.mark.parametrize("case", ["replaced", "failed-midway", "new-node"])
def test_reusing_a_segmentation_node_never_loses_its_segments(case):
    """Item 4, run against a stand-in of the few Slicer calls: the target's segments are replaced only once the
    result is complete, a failure leaves them as they were, and the scratch node is always removed."""
    from PTQLogic.core.errors import PTQError
    from PTQLogic.slicer import support

    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, :2], labels[2:] = 1, 2
    standin_support = types.SimpleNamespace(load_volume_file=lambda path: types.SimpleNamespace(array=labels),
                                            same_grid=lambda a, b: True,
                                            segments_from_label_table=support.segments_from_label_table)
    nodes, slicer_standin = _scene_standin(fail_at_segment="label_2" if case == "failed-midway" else None)
    create = _method("PTQSegmentationLogic", "createOrUpdateSegmentation", support=standin_support,
                     slicer=slicer_standin, PTQError=PTQError)
    logic = types.SimpleNamespace(volumeFromNode=lambda node: node)
    target = None if case == "new-node" else _segmentation_node_standin({"kept": ("kidney", 7)})
    volume = types.SimpleNamespace(GetName=lambda: "CT")
    if case == "failed-midway":
        with pytest.raises(MemoryError):
            create(logic, "labels.nrrd", {1: "liver", 2: "spleen"}, volume, target)
        assert target.segmentation.segments == {"kept": ("kidney", 7)} and nodes == []
        return
    result = create(logic, "labels.nrrd", {1: "liver", 2: "spleen"}, volume, target)
    assert result.segmentation.segments == {"label_1": ("liver", 12), "label_2": ("spleen", 60)}
    assert result.segmentation.source == "Binary labelmap"
    assert nodes == ([] if case == "replaced" else [result]) and (target is None or result is target)
    assert case == "replaced" or result.name == "CT PTQ"


def test_source_builds_in_a_scratch_node_before_clearing_the_target():
    """Item 4, read from the source: the target gets a binary-labelmap source before it is cleared (also under
    Slicer < 5.4's name), and is cleared only when the result is complete; the scratch node is always removed."""
    function = next(f for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == "PTQSegmentationLogic"
                    for f in n.body if isinstance(f, ast.FunctionDef) and f.name == "createOrUpdateSegmentation")
    first = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            first.setdefault(node.func.attr, node.lineno)
    assert first["updateSegmentBinaryLabelmapFromArray"] < first["RemoveAllSegments"]
    assert first["SetSourceRepresentationName"] < first["RemoveAllSegments"]
    assert first["SetMasterRepresentationName"] < first["RemoveAllSegments"]  # Slicer < 5.4 name
    assert first["RemoveAllSegments"] < first["CopySegmentFromSegmentation"]
    outer = next(n for n in function.body if isinstance(n, ast.Try))
    assert "RemoveNode(scratch)" in ast.unparse(outer.finalbody)
    assert "RemoveAllSegments" in ast.unparse(outer.body)
    assert "test_ReuseSegmentationNode" in SELF_TEST_PY.read_text()  # exercised for real in Slicer's self-test


def test_polling_shows_the_estimate_before_the_run_and_one_bar_over_the_parts():
    """nnU-Net parts: the CLI's estimate line fills the results area at once; a part's progress names it in the
    status line and moves one bar over all parts (part 2 of 5, half its windows: 30%)."""
    from PTQLogic.core.progress import estimate_line, progress_line
    from PTQLogic.slicer import support

    table, log = {}, []
    ui = types.SimpleNamespace(
        progressBar=types.SimpleNamespace(value=0), statusLabel=types.SimpleNamespace(text="Segmenting..."),
        logTextEdit=types.SimpleNamespace(appendPlainText=log.append),
        resultsTable=types.SimpleNamespace(setRowCount=lambda n: table.clear(),
                                           setItem=lambda row, column, item: table.__setitem__((row, column), item)))
    said = "Expected: 5 parts, 320 windows, network ~95 s, peak ~6.1 GiB"
    lines = [("stderr", estimate_line({"text": said, "windows": 320})), ("stderr", "note: something"),
             ("stderr", progress_line("part 2/5 (vertebrae): sliding window", 32, 64))]
    widget = types.SimpleNamespace(_job=types.SimpleNamespace(poll=lambda: (lines, None)), ui=ui,
                                   _progress=support.RunProgress())
    qt_standin = types.SimpleNamespace(QTableWidgetItem=lambda text: text)
    show = _method("PTQSegmentationWidget", "showResults", support=support, qt=qt_standin)
    widget.showResults = lambda result: show(widget, result)
    _method("PTQSegmentationWidget", "onPollJob", support=support, _=lambda text: text)(widget)
    assert table == {(0, 0): "Expected", (0, 1): "5 parts, 320 windows, network ~95 s, peak ~6.1 GiB"}
    assert log == [said, "note: something"]
    assert ui.statusLabel.text == "part 2/5 (vertebrae): sliding window 32/64" and ui.progressBar.value == 30


def _quantize_from_panel(tmp_path, method, percentile, bias_correction=False, equalize=False, model=None):
    """The module's real onQuantize, on a stand-in panel set to ``method``/``percentile``/``bias_correction`` with
    the shipped sample spec; returns the command line it hands to the background job."""
    import tempfile
    import time

    from PTQLogic.core.errors import PTQError
    from PTQLogic.slicer import support

    started, errors = [], []
    params = types.SimpleNamespace(modelPath=model or MODULE_DIR.parent / "PTQLogic" / "samples" / "data" /
                                   "phantom_unet.json",
                                   calibrationFolder=tmp_path, patches=4, method=method, percentile=percentile,
                                   biasCorrection=bias_correction, minAgreement=0.98, runtime="openvino",
                                   keepFp32OnMiss=False, equalizeChannels=equalize)
    widget = types.SimpleNamespace(
        _job=None, _jobTemp=None, _parameterNode=params, ensureDependencies=lambda: True,
        ui=types.SimpleNamespace(calibrationVolumesSelector=types.SimpleNamespace(checkedNodes=lambda: [])),
        logic=types.SimpleNamespace(pythonExecutable=lambda: "PythonSlicer"), workDirectory=lambda: tmp_path / "work",
        showError=errors.append, startJob=lambda command, title, finished: started.append(command),
        cleanupJobTemp=lambda: None, onQuantizeFinished=None)
    try:
        _method("PTQSegmentationWidget", "onQuantize", support=support, tempfile=tempfile, time=time, Path=Path,
                PTQError=PTQError, _=lambda text: text)(widget)
    finally:
        if widget._jobTemp is not None:
            widget._jobTemp.cleanup()
    assert errors == [] and len(started) == 1
    return started[0]


def test_percentile_is_offered_and_reaches_the_quantize_command(tmp_path, capsys):
    """Issue 22: the panel offers percentile; its value reaches ``quantize`` with that method only, and the real
    CLI takes the command: it gets past its option checks and stops only at the calibration folder (empty here)."""
    from PTQLogic.app.cli import build_parser, main
    from PTQLogic.slicer import support

    ui = types.SimpleNamespace(percentileSpinBox=types.SimpleNamespace(enabled=True))
    on_method = _method("PTQSegmentationWidget", "onMethodChanged")
    for method in ("max", "percentile", "entropy"):
        on_method(types.SimpleNamespace(ui=ui), method)
        assert ui.percentileSpinBox.enabled == (method == "percentile")

    def cli_error(command: list[str]) -> str:
        assert main(command[3:]) == 2
        return support.parse_result(capsys.readouterr().out)["error"]

    spec = str(MODULE_DIR.parent / "PTQLogic" / "samples" / "data" / "phantom_unet.json")
    command = _quantize_from_panel(tmp_path, "percentile", 99.95)
    out = command[command.index("--out") + 1]
    assert Path(out).parent == tmp_path / "work" / "models" and Path(out).name.startswith("phantom_unet-")
    assert command == ["PythonSlicer", "-m", "PTQLogic.app.cli", "quantize", "--model", spec,
                       "--calibration", str(tmp_path), "--out", out, "--patches", "4", "--method", "percentile",
                       "--percentile", "99.95", "--min-agreement", "0.98", "--guard-runtime", "openvino",
                       "--progress-lines", "--json"]
    args = build_parser().parse_args(command[3:])
    assert (args.method, args.percentile) == ("percentile", 99.95)
    assert cli_error(command).startswith("No calibration volumes found")

    entropy = _quantize_from_panel(tmp_path, "entropy", 99.95)  # the box keeps its value; it is not sent
    assert "--percentile" not in entropy and entropy[entropy.index("--method") + 1] == "entropy"
    assert cli_error(entropy).startswith("No calibration volumes found")
    guard = entropy.index("--min-agreement")
    assert "--percentile applies to --method percentile only" in \
        cli_error(entropy[:guard] + ["--percentile", "99.95"] + entropy[guard:])  # why it must not be sent


def test_bias_correction_box_reaches_the_quantize_command(tmp_path, capsys):
    """The panel's Bias correction box adds --bias-correction (with any method) and nothing else; the real CLI
    takes the command: it gets past its option checks and stops only at the calibration folder (empty here)."""
    from PTQLogic.app.cli import build_parser, main
    from PTQLogic.slicer import support

    def without_out(command: list[str]) -> list[str]:  # the folder's name holds the start time
        return command[:command.index("--out")] + command[command.index("--out") + 2:]

    for method in ("percentile", "entropy"):
        corrected = _quantize_from_panel(tmp_path, method, 99.95, bias_correction=True)
        plain = _quantize_from_panel(tmp_path, method, 99.95)
        assert corrected.count("--bias-correction") == 1 and "--bias-correction" not in plain
        assert without_out([arg for arg in corrected if arg != "--bias-correction"]) == without_out(plain)
        assert build_parser().parse_args(corrected[3:]).bias_correction is True
        assert main(corrected[3:]) == 2
        assert support.parse_result(capsys.readouterr().out)["error"].startswith("No calibration volumes found")


def test_toggling_bias_correction_never_reuses_a_model_made_without_it(quantized_unet, tmp_path):
    """The panel keeps no cache of quantized folders: each Quantize writes a new folder (its name is the spec and
    the start time, no options), and what is reused afterwards, the engine cache, is keyed by the INT8 model's
    content, which bias correction changes: a corrected copy of a folder gets its own engines."""
    import shutil

    from PTQLogic.engines.open import engine_cache_dir
    from PTQLogic.models.model_folder import ModelDir
    from PTQLogic.models.onnx_export import onnx_io_names
    from PTQLogic.quantization.bias_correction import correct_biases

    source = _module_tree()
    on_quantize = next(f for c in source.body if isinstance(c, ast.ClassDef) for f in c.body
                       if isinstance(f, ast.FunctionDef) and f.name == "onQuantize")
    out_dir = next(n for n in ast.walk(on_quantize)
                   if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "outDir")
    assert "strftime" in ast.unparse(out_dir.value) and "params" not in ast.unparse(out_dir.value)

    plain = ModelDir(quantized_unet)
    corrected = ModelDir(tmp_path / "corrected")
    shutil.copytree(plain.root, corrected.root)
    shape = onnx_io_names(plain.fp32_onnx)[2]
    patches = np.random.default_rng(0).normal(size=(2, *shape[1:])).astype(np.float32)
    report = correct_biases(plain.int8_onnx, plain.fp32_onnx, patches, corrected.int8_onnx)
    assert report.summary()["convs_corrected"] >= 1
    assert engine_cache_dir(corrected) != engine_cache_dir(plain)
    shutil.copyfile(plain.int8_onnx, corrected.int8_onnx)  # the same content: the same engines (no false misses)
    assert engine_cache_dir(corrected) == engine_cache_dir(plain)


def test_equalize_box_reaches_quantize_for_nnunet_folders_and_not_for_other_models(tmp_path):
    """The real onQuantize: the box adds --equalize for an nnU-Net results folder; for the sample spec (a MONAI
    UNet, which quantize would refuse it for) it is left out."""
    sys.path.insert(0, str(MODULE_DIR.parent / "Testing"))
    try:
        from nnunet_factory import dataset, plans, write_folder
    finally:
        sys.path.remove(str(MODULE_DIR.parent / "Testing"))
    folder = write_folder(tmp_path / "results", plans([1.5, 1.5, 1.5], [24, 24, 24]), dataset(["background", "liver"]))
    assert "--equalize" in _quantize_from_panel(tmp_path, "entropy", 99.99, equalize=True, model=folder)
    assert "--equalize" not in _quantize_from_panel(tmp_path, "entropy", 99.99, equalize=False, model=folder)
    assert "--equalize" not in _quantize_from_panel(tmp_path, "entropy", 99.99, equalize=True)
