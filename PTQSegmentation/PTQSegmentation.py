"""PTQSegmentation: quantize 3D segmentation networks to INT8 and segment with them inside 3D Slicer.

Thin glue: every decision lives in PTQLogic (tested without Slicer); long work runs in a separate
``PythonSlicer -m PTQLogic.app.cli`` process polled by a QTimer, so the GUI stays responsive. Only a
few small, named methods touch MRML (see Testing/test_slicer_module_wiring.py).
"""
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
    ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

_MODULE_DIR = Path(__file__).resolve().parent
for _candidate in (_MODULE_DIR, _MODULE_DIR.parent):  # installed extension / source checkout
    if (_candidate / "PTQLogic" / "__init__.py").is_file():
        if str(_candidate) not in sys.path:
            sys.path.insert(0, str(_candidate))
        break

from PTQLogic.slicer import support as support  # noqa: E402  (no torch: safe in Slicer's process)
from PTQLogic.core.errors import PTQError  # noqa: E402

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
    method: Annotated[str, Choice(["max", "entropy"])] = "entropy"
    minAgreement: Annotated[float, WithinRange(0.0, 1.0)] = 0.98  # accuracy guard; 0 = measure only (--no-guard)
    precision: Annotated[str, Choice(["int8", "fp16", "fp32"])] = "int8"
    runtime: Annotated[str, Choice(RUNTIMES)] = "auto"
    trtOptLevel: Annotated[int, WithinRange(0, 5)] = 2  # TensorRT builder level; PTQLogic's default too
    cpuBf16: bool = False  # OpenVINO INT8: float remainder in bf16 (AMX CPUs)
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
                                               min_agreement=params.minAgreement or None, runtime=params.runtime)
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
                                              trt_opt_level=params.trtOptLevel, cpu_bf16=params.cpuBf16)
        except Exception as error:  # PTQError, or SimpleITK/segmentation/OS errors while exporting inputs
            self.cleanupJobTemp()
            self.showError(str(error))
            return
        self.startJob(command, _("Comparing FP32 and INT8") if compare else _("Segmenting"), self.onSegmentFinished)

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
            progress = support.parse_progress(line) if stream == "stderr" else None
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


class PTQSegmentationTest(ScriptedLoadableModuleTest):
    """Runs for real inside Slicer: quantize the shipped sample model and segment with INT8 vs FP32."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_VolumeGeometryRoundTrip()
        self.setUp()
        self.test_ReuseSegmentationNode()
        self.setUp()
        self.test_QuantizeSegmentCompare()

    def _phantomNode(self, seed, name):
        from PTQLogic.samples.phantom import make_phantom

        image, _labels = make_phantom(seed, shape=(48, 64, 64))
        node = slicer.util.addVolumeFromArray(image.array, name=name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(image.ijk_to_ras))
        return node

    def _inputVolume(self):
        try:
            import SampleData

            node = SampleData.downloadSample("CTChest")
        except Exception:  # offline: a CT-like phantom exercises the same geometry path
            node = None
        return node or self._phantomNode(3, "phantom")

    def test_VolumeGeometryRoundTrip(self):
        self.delayDisplay("Export a volume for the engine and read it back")
        logic = PTQSegmentationLogic()
        volumeNode = self._inputVolume()
        before = slicer.util.arrayFromVolume(volumeNode).copy()
        with tempfile.TemporaryDirectory() as temp:
            path = logic.exportVolumeToFile(volumeNode, Path(temp) / "input.nrrd")
            restored = support.load_volume_file(path)
        original = logic.volumeFromNode(volumeNode)
        self.assertTrue(support.same_grid(restored, original))
        self.assertTrue((restored.array == before).all())
        self.assertTrue((slicer.util.arrayFromVolume(volumeNode) == before).all())

    def test_ReuseSegmentationNode(self):
        self.delayDisplay("Re-run into an output node whose source representation is a closed surface")
        logic = PTQSegmentationLogic()
        volumeNode = self._phantomNode(5, "reuse input")
        array = slicer.util.arrayFromVolume(volumeNode)
        labels = (array > array.mean()).astype("uint8")
        binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        closed = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
        with tempfile.TemporaryDirectory() as temp:
            path = support.save_volume_file(support.Volume(labels, logic.volumeFromNode(volumeNode).ijk_to_ras),
                                            Path(temp) / "labels.nrrd")
            node = logic.createOrUpdateSegmentation(path, {0: "background", 1: "liver"}, volumeNode)
            node.GetSegmentation().SetSourceRepresentationName(closed)
            again = logic.createOrUpdateSegmentation(path, {0: "background", 1: "spleen"}, volumeNode, node)
        segmentation = again.GetSegmentation()
        self.assertIs(again, node)
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                         ["spleen"])
        self.assertEqual(segmentation.GetSourceRepresentationName(), binary)
        self.assertGreater(slicer.util.arrayFromSegmentBinaryLabelmap(again, segmentation.GetNthSegmentID(0),
                                                                      volumeNode).sum(), 0)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), 1)  # no scratch node left

    def test_QuantizeSegmentCompare(self):
        logic = PTQSegmentationLogic()
        plan = logic.dependencyPlan()
        if plan.needed:
            self.delayDisplay("Installing: " + ", ".join(plan.to_install))
            logic.installDependencies(plan)
        spec = support.ptqlogic_parent_dir(_MODULE_DIR) / "PTQLogic" / "samples" / "data" / "phantom_unet.json"
        self.assertTrue(spec.is_file(), f"shipped sample spec missing: {spec}")
        # The shipped sample network was trained on phantoms, so a phantom makes Dice meaningful.
        inputNode = self._phantomNode(0, "phantom input")
        calibrationNode = self._phantomNode(1, "phantom calibration")
        before = slicer.util.arrayFromVolume(inputNode).copy()
        with tempfile.TemporaryDirectory() as temp:
            temp = Path(temp)
            calibration = logic.exportVolumeToFile(calibrationNode, temp / "calib.nrrd")
            self.delayDisplay("Quantizing with 4 calibration patches")
            quantized = logic.runBlocking(support.quantize_command(
                logic.pythonExecutable(), spec, [calibration], temp / "model", 4, "max"))
            inputPath = logic.exportVolumeToFile(inputNode, temp / "input.nrrd")
            self.delayDisplay("Segmenting with INT8 and comparing with FP32")
            result = logic.runBlocking(support.segment_command(
                logic.pythonExecutable(), quantized["model_dir"], inputPath, temp / "labels.nrrd", "auto", "int8", True))
            segmentationNode = logic.createOrUpdateSegmentation(result["output"], result["labels_json"], inputNode)
        self.assertIsNotNone(segmentationNode)
        geometryImage = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(
            segmentationNode.GetSegmentation().GetConversionParameter("Reference image geometry"), geometryImage)
        actual, expected = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        geometryImage.GetImageToWorldMatrix(actual)
        inputNode.GetIJKToRASMatrix(expected)
        for row in range(3):
            for col in range(4):
                self.assertAlmostEqual(actual.GetElement(row, col), expected.GetElement(row, col), 4)
        self.assertEqual(tuple(geometryImage.GetDimensions()), tuple(inputNode.GetImageData().GetDimensions()))
        names = [segmentationNode.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentationNode.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["liver", "spleen", "kidney_right", "kidney_left", "aorta", "vertebra"])
        self.assertGreaterEqual(result["agreement_dice"], 0.9)
        self.assertTrue((slicer.util.arrayFromVolume(inputNode) == before).all())
        self.delayDisplay(f"Test passed: agreement Dice {result['agreement_dice']:.4f}")
