"""What a model is: specs, networks, ONNX export, model sources (spec, TorchScript/ONNX, MONAI bundle, nnU-Net) and the model folder."""
