"""ONNX graph edits and Q/DQ checks shared by quantization and the engines."""
