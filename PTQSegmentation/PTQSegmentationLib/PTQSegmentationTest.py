"""The module's self-test: runs for real inside Slicer (Developer Tools > Reload and Test, or
``ctest -R py_PTQSegmentation``).

Slicer looks for the ``PTQSegmentationTest`` class in PTQSegmentation.py, which imports it from here. It lives in
a package folder because Slicer takes every .py file next to PTQSegmentation.py for a module of its own.
"""
import tempfile
from pathlib import Path

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from PTQLogic.slicer import support

_MODULE_DIR = Path(__file__).resolve().parents[1]  # the folder of PTQSegmentation.py


def _moduleLogic():
    """The module's logic, imported on use: PTQSegmentation.py imports this file while it loads."""
    from PTQSegmentation import PTQSegmentationLogic

    return PTQSegmentationLogic()


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
        logic = _moduleLogic()
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
        logic = _moduleLogic()
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
        logic = _moduleLogic()
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
