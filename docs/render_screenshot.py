"""Render docs/screenshot.png: the module's real panel (.ui), drawn by Qt without Slicer.

3D Slicer cannot run where this project is built, so the picture is the module's own
``PTQSegmentation.ui`` loaded with PySide6 (``pip install PySide6-Essentials``; a documentation tool,
not a runtime dependency) on Qt's offscreen platform. Slicer's CTK/MRML widgets are replaced by the
Qt classes they derive from (ctkCollapsibleButton -> QGroupBox, ctkPathLineEdit -> QLineEdit,
qMRMLNodeComboBox -> QComboBox, ...), so the layout, labels, choices and tooltips are the module's,
and the look is plain Qt rather than Slicer's style. Widgets are filled as the module fills them: the
sample models, the "Detected" line from PTQLogic's model detection, and (with ``--result``) the
results table from a real ``ptqseg segment --json`` result.

    QT_QPA_PLATFORM=offscreen python docs/render_screenshot.py [--result segment.json] [--out docs/screenshot.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "PTQSegmentation" / "Resources" / "UI" / "PTQSegmentation.ui"
# CTK/MRML class -> (Qt base class, {CTK property: Qt property or None to drop})
SUBSTITUTES = {
    "ctkCollapsibleButton": ("QGroupBox", {"text": "title", "collapsed": None}),
    "ctkCollapsibleGroupBox": ("QGroupBox", {"collapsed": None}),
    "ctkPathLineEdit": ("QLineEdit", {"filters": None}),
    "qMRMLNodeComboBox": ("QComboBox", {}),
    "qMRMLCheckableNodeComboBox": ("QComboBox", {}),
    "qMRMLWidget": ("QWidget", {}),
}
MRML_ONLY = {"nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "renameEnabled",
             "noneDisplay", "SlicerParameterName"}


def qt_only_ui(text: str) -> bytes:
    """The .ui with CTK/MRML widgets turned into their Qt base classes and MRML-only properties dropped."""
    root = ET.fromstring(text)
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls in SUBSTITUTES:
            base, renames = SUBSTITUTES[cls]
            widget.set("class", base)
            for prop in list(widget.findall("property")):
                name = prop.get("name")
                if name in renames:
                    if renames[name] is None:
                        widget.remove(prop)
                    else:
                        prop.set("name", renames[name])
        for prop in list(widget.findall("property")):
            if prop.get("name") in MRML_ONLY:
                widget.remove(prop)
    for section in ("customwidgets", "connections"):
        for element in root.findall(section):
            root.remove(element)
    return ET.tostring(root, encoding="utf-8")


def render(out: Path, result: dict | None, width: int = 430) -> Path:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QTableWidgetItem, QWidget

    sys.path.insert(0, str(ROOT))
    from PTQLogic.slicer import support as support

    app = QApplication.instance() or QApplication([])
    data = QByteArray(qt_only_ui(UI_FILE.read_text(encoding="utf-8")))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    find = lambda name: panel.findChild(QWidget, name)  # noqa: E731

    sample = ROOT / "PTQLogic" / "samples" / "data" / "phantom_unet.json"
    for spec in sorted((ROOT / "PTQLogic" / "samples" / "data").glob("*.json")):
        find("sampleModelComboBox").addItem(spec.stem)
    find("inputVolumeSelector").addItem("phantom input")
    find("calibrationVolumesSelector").addItem("phantom calibration")
    find("outputSegmentationSelector").addItem("phantom input PTQ")
    find("referenceSegmentationSelector").addItem("phantom labels" if result and result.get("reference_dice") else "None")
    find("sampleModelComboBox").setCurrentText(sample.stem)
    find("methodComboBox").setCurrentText("entropy")  # the parameter node's default, as the module sets it
    find("modelPathLineEdit").setText(f".../PTQLogic/samples/data/{sample.name}")
    find("modelPathLineEdit").setCursorPosition(0)
    source = support.choose_model_source(str(sample))
    find("modelDescriptionLabel").setText(f"{source.kind}: {source.description}")
    if result:
        find("modelDirLineEdit").setText(".../PTQSegmentation/models/phantom_unet-int8")
        find("modelDirLineEdit").setCursorPosition(0)
        rows = support.results_rows(result)
        table = find("resultsTable")
        table.setRowCount(len(rows))
        for row, (label, value) in enumerate(rows):
            table.setItem(row, 0, QTableWidgetItem(label))
            table.setItem(row, 1, QTableWidgetItem(value))
        find("runtimeReasonLabel").setText(f"{result.get('runtime')}: {result.get('runtime_reason') or ''}")
        find("statusLabel").setText("Done.")
        find("progressBar").setValue(100)
    find("cancelButton").setEnabled(False)
    panel.resize(width, panel.sizeHint().height())
    panel.resize(width, max(panel.sizeHint().height(), panel.minimumSizeHint().height()))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        raise SystemExit(f"could not write {out}")
    app.processEvents()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--result", help="JSON printed by `ptqseg segment --compare --json` to show in the table")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    args = parser.parse_args()
    result = json.loads(Path(args.result).read_text()) if args.result else None
    print(render(Path(args.out), result))


if __name__ == "__main__":
    main()
