"""PTQLogic: post-training INT8 quantization and inference engines for 3D medical segmentation.

No Slicer imports here: the Slicer module (PTQSegmentation) is thin glue over this package.
"""
__version__ = "0.1.0"

from .core.offline import stay_offline as _stay_offline

# Before any library is imported: no telemetry (OpenVINO, ONNX Runtime, Ray), no caches written to ~.
_stay_offline()
