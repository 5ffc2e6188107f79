"""PTQSegmentation: quantize 3D segmentation networks to INT8 and segment with them inside 3D Slicer.

Thin glue: every decision lives in PTQLogic (tested without Slicer); long work runs in a separate
``PythonSlicer -m PTQLogic.app.cli`` process polled by a QTimer, so the GUI stays responsive. Only a
few small, named methods touch MRML (see Testing/test_slicer_module_wiring.py).
"""
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

_MODULE_DIR = Path(__file__).resolve().parent
for _candidate in (_MODULE_DIR, _MODULE_DIR.parent):  # installed extension / source checkout
    if (_candidate / "PTQLogic" / "__init__.py").is_file():
        if str(_candidate) not in sys.path:
            sys.path.insert(0, str(_candidate))
        break

if str(_MODULE_DIR) not in sys.path:  # PTQSegmentationLib lies next to this file
    sys.path.append(str(_MODULE_DIR))

from PTQLogic.slicer import support as support  # noqa: E402  (no torch: safe in Slicer's process)
from PTQLogic.core.errors import PTQError  # noqa: E402

# Slicer finds the self-test as PTQSegmentationTest in this file. Reload re-runs this file only: reload the
# self-test's file too, so that Reload and Test runs its current code.
if "PTQSegmentationLib.PTQSegmentationTest" in sys.modules:
    importlib.reload(sys.modules["PTQSegmentationLib.PTQSegmentationTest"])
from PTQSegmentationLib.PTQSegmentationTest import PTQSegmentationTest  # noqa: E402,F401

RUNTIMES = ["auto", "tensorrt", "openvino", "onnxruntime", "torch"]


class PTQSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PTQ Segmentation")
        # core modules' context: the category merges with Slicer's own (translated) Segmentation category
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["PTQSegmentation contributors"]
        self.parent.helpText = _(
            "Quantize a trained 3D segmentation network to INT8 (NVIDIA ModelOpt, ONNX Q/DQ) and segment the "
            "selected volume with TensorRT, OpenVINO or ONNX Runtime. Compare INT8 with FP32 before trusting it.")
        self.parent.acknowledgementText = _("Uses MONAI, ONNX, NVIDIA ModelOpt, TensorRT, OpenVINO, ONNX Runtime.")


@parameterNodeWrapper
class PTQSegmentationParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: Path
    calibrationVolumes: list[vtkMRMLScalarVolumeNode]
    calibrationFolder: Path
    patches: Annotated[int, WithinRange(1, 4096)] = 32
    method: Annotated[str, Choice(["max", "entropy", "percentile"])] = "entropy"
    percentile: Annotated[float, WithinRange(99.0, 99.9999)] = 99.99  # method "percentile" only; PTQLogic's default
    biasCorrection: bool = False  # opt-in --bias-correction (any method; docs/fidelity.md)
    minAgreement: Annotated[float, WithinRange(0.0, 1.0)] = 0.98  # accuracy guard; 0 = measure only (--no-guard)
    keepFp32OnMiss: bool = False  # nnU-Net: --on-miss fp32 (a part whose INT8 misses the guard runs in FP32)
    equalizeChannels: bool = False  # nnU-Net PlainConvUNet: --equalize (channel equalization before export)
    precision: Annotated[str, Choice(["auto", "int8", "fp16", "fp32"])] = "auto"
    runtime: Annotated[str, Choice(RUNTIMES)] = "auto"
    trtOptLevel: Annotated[int, WithinRange(0, 5)] = 2  # TensorRT builder level; PTQLogic's default too
    cpuBf16: bool = False  # OpenVINO INT8: float remainder in bf16 (AMX CPUs)
    fp32Windows: Annotated[float, WithinRange(0.0, 1.0)] = 0.0  # nnU-Net INT8: share of unsure windows from FP32
    modelDir: Path
    outputSegmentation: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode


class PTQSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobFinished = None
        self._jobTemp = None
        self._installing = False
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPollJob)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PTQSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PTQSegmentationLogic()
        for sample in self.logic.sampleModels():
            self.ui.sampleModelComboBox.addItem(sample.stem, str(sample))
        self.ui.sampleModelComboBox.connect("activated(int)", self.onSampleModelChosen)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.modelFolderButton.connect("clicked(bool)", self.onBrowseModelFolder)
        self.ui.quantizeButton.connect("clicked(bool)", self.onQuantize)
        self.ui.segmentButton.connect("clicked(bool)", lambda _checked=False: self.onSegment(compare=False))
        self.ui.compareButton.connect("clicked(bool)", lambda _checked=False: self.onSegment(compare=True))
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.dependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self.ui.calibrationVolumesSelector.connect("checkedNodesChanged()", self.onCalibrationVolumesChanged)
        self.ui.methodComboBox.connect("currentTextChanged(QString)", self.onMethodChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.setBusy(False)

    def cleanup(self):
        self.onCancel()
        self._timer.stop()
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # a GUI tag can be 0 (Slicer 5.10's first) or None (connectGui returns None before 5.10): test "is not None"
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:  # the first scalar volume that is not a label map
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            self._parameterNode.inputVolume = next(
                (node for node in volumes if not node.IsA("vtkMRMLLabelMapVolumeNode")), None)
        checked = {node.GetID() for node in self._parameterNode.calibrationVolumes if node}
        for index in range(self.ui.calibrationVolumesSelector.nodeCount()):
            node = self.ui.calibrationVolumesSelector.nodeFromIndex(index)
            self.ui.calibrationVolumesSelector.setCheckState(node, qt.Qt.Checked if node.GetID() in checked
                                                              else qt.Qt.Unchecked)

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            tag = self._parameterNode.connectGui(self.ui)
            self._parameterNodeGuiTag = 0 if tag is None else tag
            self.onModelPathChanged(str(self._parameterNode.modelPath or ""))
            self.onMethodChanged(self._parameterNode.method)  # connecting changes no text when it already matches

    # ------------------------------------------------------------------ inputs

    def onSampleModelChosen(self, index):
        self.ui.modelPathLineEdit.currentPath = self.ui.sampleModelComboBox.itemData(index)

    def onBrowseModelFolder(self, _checked=False):
        # ctkPathLineEdit's own button opens a file dialog whenever Files is allowed: folders need their own
        start = str(self.ui.modelPathLineEdit.currentPath or "")
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a model folder"), start)
        if folder:
            self.ui.modelPathLineEdit.currentPath = folder

    def onModelPathChanged(self, path):
        if not path or path == ".":
            self.ui.modelDescriptionLabel.text = _("Choose a model spec, ONNX/TorchScript file or model folder.")
            return
        try:
            source = support.choose_model_source(path)
        except PTQError as error:
            self.ui.modelDescriptionLabel.text = str(error)
            return
        self.ui.modelDescriptionLabel.text = f"{source.kind}: {source.description}"
        if source.segmentable and self._parameterNode:
            self._parameterNode.modelDir = Path(source.path)

    def onMethodChanged(self, method):
        self.ui.percentileSpinBox.enabled = method == "percentile"

    def onCalibrationVolumesChanged(self):
        if self._parameterNode:
            self._parameterNode.calibrationVolumes = list(self.ui.calibrationVolumesSelector.checkedNodes())

    # ------------------------------------------------------------------ actions

    def onQuantize(self):
        if not support.quantization_supported():
            self.showError(support.QUANTIZE_NEEDS_NEWER_PYTHON)
            return
        if self._job or not self.ensureDependencies():
            return
        params = self._parameterNode
        try:
            source = support.choose_model_source(str(params.modelPath))
            if not source.quantizable:
                raise PTQError(source.description)
            self._jobTemp = tempfile.TemporaryDirectory(prefix="ptqseg-")
            calibration = [self.logic.exportVolumeToFile(node, Path(self._jobTemp.name) / f"calib{i}.nrrd")
                           for i, node in enumerate(self.ui.calibrationVolumesSelector.checkedNodes())]
            if str(params.calibrationFolder) not in ("", "."):
                calibration.append(params.calibrationFolder)
            outDir = self.workDirectory() / "models" / f"{Path(source.spec_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            command = support.quantize_command(self.logic.pythonExecutable(), source.spec_path, calibration, outDir,
                                               params.patches, params.method,
                                               min_agreement=params.minAgreement or None, runtime=params.runtime,
                                               percentile=params.percentile, bias_correction=params.biasCorrection,
                                               on_miss="fp32" if params.keepFp32OnMiss else "fail",
                                               equalize=params.equalizeChannels and source.kind == "nnunet")
        except Exception as error:  # PTQError, or SimpleITK/OS errors while exporting the scene volumes
            self.cleanupJobTemp()
            self.showError(str(error))
            return
        self.startJob(command, _("Quantizing"), self.onQuantizeFinished)

    def onQuantizeFinished(self, result):
        self._parameterNode.modelDir = Path(result["model_dir"])
        self.showResults(result)

    def onSegment(self, compare):
        if self._job or not self.ensureDependencies():
            return
        params = self._parameterNode
        try:
            if not params.inputVolume:
                raise PTQError("Choose an input volume.")
            support.check_segment_model(params.modelDir, reference=bool(params.referenceSegmentation))
            if compare and params.runtime == "torch" and params.precision in ("auto", "fp32", "int8"):
                raise PTQError(_("Compare runs a quantized (INT8) or FP16 engine against FP32: choose another runtime, "
                                 "or FP16 for PyTorch on an NVIDIA GPU."))
            precision = "int8" if compare and params.precision == "fp32" else params.precision
            self._jobTemp = tempfile.TemporaryDirectory(prefix="ptqseg-")
            temp = Path(self._jobTemp.name)
            inputPath = self.logic.exportVolumeToFile(params.inputVolume, temp / "input.nrrd")
            reference = None
            if params.referenceSegmentation:
                reference = self.logic.exportReferenceLabels(params.referenceSegmentation, params.inputVolume,
                                                             Path(params.modelDir) / "spec.json", temp / "reference.nrrd")
            command = support.segment_command(self.logic.pythonExecutable(), params.modelDir, inputPath,
                                              temp / "labels.nrrd", params.runtime, precision, compare, reference,
                                              trt_opt_level=params.trtOptLevel, cpu_bf16=params.cpuBf16,
                                              fp32_windows=params.fp32Windows)
        except Exception as error:  # PTQError, or SimpleITK/segmentation/OS errors while exporting inputs
            self.cleanupJobTemp()
            self.showError(str(error))
            return
        self.startJob(command, _("Comparing with FP32") if compare else _("Segmenting"), self.onSegmentFinished)

    def onSegmentFinished(self, result):
        params = self._parameterNode
        params.outputSegmentation = self.logic.createOrUpdateSegmentation(
            result["output"], result["labels_json"], params.inputVolume, params.outputSegmentation)
        self.ui.runtimeReasonLabel.text = f"{result.get('runtime')}: {result.get('runtime_reason') or ''}"
        self.showResults(result)

    def showResults(self, result):
        rows = support.results_rows(result)
        self.ui.resultsTable.setRowCount(len(rows))
        for row, (label, value) in enumerate(rows):
            self.ui.resultsTable.setItem(row, 0, qt.QTableWidgetItem(label))
            self.ui.resultsTable.setItem(row, 1, qt.QTableWidgetItem(value))

    # ------------------------------------------------------------------ background job

    def startJob(self, command, title, onFinished):
        self.ui.logTextEdit.appendPlainText("$ " + " ".join(command))
        env = support.engine_environment(os.environ, support.ptqlogic_parent_dir(_MODULE_DIR))
        self._job = support.BackgroundProcess(command, env=env)
        self._progress = support.RunProgress()
        self._jobFinished = onFinished
        self.ui.statusLabel.text = title + "..."
        self.ui.progressBar.value = 0
        self.setBusy(True)
        self._timer.start()

    def onPollJob(self):
        if not self._job:
            return
        lines, returnCode = self._job.poll()
        for stream, line in lines:
            progress = self._progress.update(line) if stream == "stderr" else None
            estimate = support.parse_estimate(line) if stream == "stderr" else None
            if progress:
                self.ui.progressBar.value = int(100 * progress[0])
                self.ui.statusLabel.text = progress[1]
            elif estimate:  # nnU-Net: expected time and memory, before the long work
                self.ui.logTextEdit.appendPlainText(estimate["text"])
                self.showResults({"estimate": estimate})
            elif stream == "stderr":
                self.ui.logTextEdit.appendPlainText(line)
        if returnCode is None:
            return
        job, onFinished = self._job, self._jobFinished
        self._timer.stop()
        self._job = None
        self.setBusy(False)
        try:
            if job.cancelled:
                self.ui.statusLabel.text = _("Cancelled; nothing partial was kept.")
            elif returnCode != 0:
                self.showError(support.parse_error("\n".join(job.stderr_lines)), "\n".join(job.stderr_lines[-40:]))
            else:
                result = support.parse_result("\n".join(job.stdout_lines))
                self.ui.logTextEdit.appendPlainText("\n".join(job.stdout_lines))
                onFinished(result)
                notes = result.get("warnings") or []
                for note in notes:  # e.g. INT8 on a CPU without VNNI/AMX, a reference resampled to the input
                    self.ui.logTextEdit.appendPlainText(_("Note: ") + note)
                self.ui.statusLabel.text = _("Done; see the notes in the log.") if notes else _("Done.")
                self.ui.progressBar.value = 100
        except Exception as error:  # a failed import into the scene must not kill the timer callback silently
            self.showError(str(error))
        finally:
            self.cleanupJobTemp()

    def cleanupJobTemp(self):
        if self._jobTemp:
            self._jobTemp.cleanup()
            self._jobTemp = None

    def onCancel(self):
        if self._job:
            self.ui.statusLabel.text = _("Cancelling...")
            self._job.cancel()
            self.onPollJob()

    def setBusy(self, busy):
        for button in (self.ui.quantizeButton, self.ui.segmentButton, self.ui.compareButton,
                       self.ui.dependenciesButton):
            button.enabled = not busy
        self.ui.cancelButton.enabled = busy

    # ------------------------------------------------------------------ Slicer services

    def showError(self, message, details=""):
        self.ui.statusLabel.text = _("Failed: ") + message
        self.ui.logTextEdit.appendPlainText("error: " + message)
        if details:
            slicer.util.errorDisplay(message, detailedText=details)
        else:
            slicer.util.errorDisplay(message)

    def workDirectory(self):
        return Path(slicer.app.cachePath) / "PTQSegmentation"

    def onCheckDependencies(self):
        if self._job or not self.ensureDependencies():
            return
        self.ui.logTextEdit.appendPlainText(support.versions_report())
        # Which runtime "auto" picks needs torch/OpenVINO/TensorRT imports: ask the engine process.
        self.startJob(support.info_command(self.logic.pythonExecutable()), _("Checking runtimes"), self.onInfoFinished)

    def onInfoFinished(self, info):
        self.ui.runtimeReasonLabel.text = support.runtime_choice_text(info)

    def ensureDependencies(self):
        plan = self.logic.dependencyPlan()
        if not plan.needed:
            return True
        if self._installing or not slicer.util.confirmOkCancelDisplay(
                plan.message, windowTitle=_("Install Python packages?")):
            return False
        # pip_install blocks this thread; disable the buttons so no second job or install starts meanwhile
        self._installing = True
        self.setBusy(True)
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = _("Installing Python packages (this can take several minutes)...")
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            self.logic.installDependencies(plan)
        except Exception as error:  # pip failures come as many exception types; show them all
            self.showError(_("Installing Python packages failed: ") + str(error))
            return False
        finally:
            slicer.app.restoreOverrideCursor()
            self._installing = False
            self.setBusy(False)
        self.ui.logTextEdit.appendPlainText(support.versions_report())
        return True


class PTQSegmentationLogic(ScriptedLoadableModuleLogic):
    def getParameterNode(self):
        return PTQSegmentationParameterNode(super().getParameterNode())

    def pythonExecutable(self):
        return support.default_python()

    def sampleModels(self):
        return support.sample_models(support.ptqlogic_parent_dir(_MODULE_DIR) / "PTQLogic" / "samples" / "data")

    def dependencyPlan(self):
        names = list(support.REQUIRED) + ["onnxruntime-gpu", "tensorrt", "numpy", "simpleitk"]
        return support.dependency_plan(support.installed_versions(names), support.has_nvidia_gpu())

    def installDependencies(self, plan):
        for name in plan.to_uninstall:
            slicer.util.pip_uninstall(name)
        if plan.to_install:
            constraints = Path(tempfile.mkdtemp(prefix="ptqseg-")) / "slicer-constraints.txt"
            constraints.write_text("\n".join(plan.constraints) + "\n")
            slicer.util.pip_install(["-c", str(constraints)] + plan.to_install)

    def volumeFromNode(self, volumeNode):
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        if volumeNode.GetParentTransformNode():
            raise PTQError(f"'{volumeNode.GetName()}' is under a transform; harden the transform first.")
        return support.volume_from_slicer_arrays(slicer.util.arrayFromVolume(volumeNode),
                                                 slicer.util.arrayFromVTKMatrix(matrix))

    def exportVolumeToFile(self, volumeNode, path):
        """Write the node's voxels and geometry to ``path`` without touching the node or its storage."""
        return support.save_volume_file(self.volumeFromNode(volumeNode), path)

    def exportReferenceLabels(self, segmentationNode, referenceVolume, specPath, path):
        """Reference segments (matched to model classes by name) as a label map on the input grid."""
        from PTQLogic.core.spec import load_spec

        segmentation = segmentationNode.GetSegmentation()
        masks = {}
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            masks[segmentation.GetSegment(segmentId).GetName()] = slicer.util.arrayFromSegmentBinaryLabelmap(
                segmentationNode, segmentId, referenceVolume)
        labels, _matched = support.reference_label_array(masks, load_spec(specPath).class_names)
        reference = self.volumeFromNode(referenceVolume)
        return support.save_volume_file(support.Volume(labels, reference.ijk_to_ras), path)

    def createOrUpdateSegmentation(self, labelmapPath, labelsJson, referenceVolume, segmentationNode=None):
        """Replace the segments of ``segmentationNode`` (or a new node) with the engine's label map."""
        labels = support.load_volume_file(labelmapPath)
        if not support.same_grid(labels, self.volumeFromNode(referenceVolume)):
            raise PTQError("The engine's label map is not on the input volume's grid.")
        specs = support.segments_from_label_table(labelsJson)
        # Build the result in a scratch node first: the user's segments are replaced only once it is complete.
        scratch = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PTQ scratch")
        scratch.SetHideFromEditors(True)
        try:
            scratch.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
            result = scratch.GetSegmentation()
            for spec in specs:
                segmentId = result.AddEmptySegment(f"label_{spec.value}", spec.name, spec.color_rgb_float)
                segment = result.GetSegment(segmentId)
                if spec.terminology and hasattr(segment, "SetTerminology"):  # Slicer >= 5.7
                    segment.SetTerminology(spec.terminology)
                elif spec.terminology:
                    segment.SetTag(segment.GetTerminologyEntryTagName(), spec.terminology)
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    (labels.array == spec.value).astype("uint8"), scratch, segmentId, referenceVolume)
            if segmentationNode is None:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(referenceVolume.GetName() + " PTQ"))
                segmentationNode.CreateDefaultDisplayNodes()
            segmentation = segmentationNode.GetSegmentation()
            wasModified = segmentationNode.StartModify()
            try:
                # binary labelmap source first: importing into a closed-surface source node fails after clearing
                labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
                if hasattr(segmentation, "SetSourceRepresentationName"):  # Slicer >= 5.4 ("Master" before)
                    segmentation.SetSourceRepresentationName(labelmapName)
                else:
                    segmentation.SetMasterRepresentationName(labelmapName)
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
                segmentation.RemoveAllSegments()
                for index in range(result.GetNumberOfSegments()):
                    if not segmentation.CopySegmentFromSegmentation(result, result.GetNthSegmentID(index)):
                        raise PTQError("Copying the new segments into the output segmentation failed.")
            finally:
                segmentationNode.EndModify(wasModified)
        finally:
            slicer.mrmlScene.RemoveNode(scratch)
        segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentationNode

    def runBlocking(self, command):
        """Run an engine command to completion (scripts and the self-test); returns its JSON result."""
        env = support.engine_environment(os.environ, support.ptqlogic_parent_dir(_MODULE_DIR))
        job = support.BackgroundProcess(command, env=env)
        if job.wait() != 0:
            raise PTQError(support.parse_error("\n".join(job.stderr_lines)))
        return support.parse_result("\n".join(job.stdout_lines))
