"""PTQLogic: post-training INT8 quantization and inference engines for 3D medical segmentation.

No Slicer imports here: the Slicer module (PTQSegmentation) is thin glue over this package.
"""
__version__ = "0.1.0"

import sys as _sys

# Nothing is sent and nothing is written to ~/intel: `import openvino` starts Intel's usage telemetry
# (a client id in ~/intel/openvino_ga_cid, usage counters, Google Analytics events) unless the
# `openvino_telemetry` package cannot be imported, in which case OpenVINO uses its own no-op stub.
_sys.modules.setdefault("openvino_telemetry", None)
