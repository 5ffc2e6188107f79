"""ONNX Runtime: the portable runtime for the FP32 and the Q/DQ INT8 ONNX (CPU, or CUDA when present)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import EngineUnavailable, ModelError
from .base import EngineInfo


def _cuda_usable() -> bool:
    # onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()


def _cpu_fp32_graph(onnx_path: Path) -> tuple[str | bytes, int]:
    """The FP32 graph ONNX Runtime's CPU provider runs: ConvTranspose layers rewritten exactly as sub-pixel
    Conv + shuffle (``quantization.conv_rewrites``; its 3D ConvTranspose is a slow reference loop, two thirds
    of a MONAI UNet's time), with BatchNorm/PReLU folded. Returns (model bytes, rewrites) or (path, 0)."""
    import onnx

    from ..onnx_graph.edit import drop_unused_initializers

    from ..onnx_graph.graph_prep import prepare_for_int8

    try:
        model = onnx.load(str(onnx_path))
        if not any(node.op_type == "ConvTranspose" for node in model.graph.node):
            return str(onnx_path), 0
        counts = prepare_for_int8(model, fold_residual=True, subpixel=True, shuffle="depth_to_space")
        if not counts.get("convtranspose_to_subpixel"):
            return str(onnx_path), 0
        drop_unused_initializers(model)
        return model.SerializeToString(), counts["convtranspose_to_subpixel"]
    except Exception:  # an unusual graph the rewrites cannot read: run it as exported
        return str(onnx_path), 0


class OnnxRuntimeEngine:
    """Runs an exported ONNX; ``precision`` names the artifact ("fp32" for fp32.onnx, "int8" for int8.onnx)."""

    def __init__(
        self,
        onnx_path: str | Path,
        precision: str,
        device: str | torch.device | None = None,
        threads: int | None = None,
    ):
        try:
            import onnxruntime
        except ImportError:
            raise EngineUnavailable("ONNX Runtime is not installed (pip install onnxruntime).") from None
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelError(f"ONNX file '{onnx_path}' does not exist.")
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda":
            if not _cuda_usable():
                raise EngineUnavailable("ONNX Runtime CUDA needs onnxruntime-gpu and an NVIDIA GPU; use device 'cpu'.")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = onnxruntime.SessionOptions()
        # ENABLE_ALL lets the CPU provider fuse Q/DQ pairs into integer kernels where it can
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        source, self.subpixel_layers = str(onnx_path), 0
        if self.device.type == "cpu" and precision == "fp32":
            source, self.subpixel_layers = _cpu_fp32_graph(onnx_path)
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=providers)
        except Exception as exc:
            if self.subpixel_layers == 0:
                raise ModelError(f"ONNX Runtime cannot load '{onnx_path}': {exc}") from None
            self.subpixel_layers = 0  # the rewritten graph does not load: run the file as exported
            try:
                self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=providers)
            except Exception as exc:
                raise ModelError(f"ONNX Runtime cannot load '{onnx_path}': {exc}") from None
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # ORT falls back to CPU silently when the CUDA provider fails to start (e.g. no matching cuDNN)
            raise EngineUnavailable("ONNX Runtime could not start its CUDA provider here (check CUDA/cuDNN "
                                    "versions for this onnxruntime-gpu); use device 'cpu' or TensorRT.")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.precision = precision
        self.info = EngineInfo(
            runtime="onnxruntime",
            precision=precision,
            device=str(self.device),
            runtime_version=onnxruntime.__version__,
            bytes_on_disk=onnx_path.stat().st_size,
            path=str(onnx_path),
            build={"graph_rewrite": f"{self.subpixel_layers} ConvTranspose as sub-pixel Conv (exact)"}
            if self.subpixel_layers else None,
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._run_cuda(batch)
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()  # shares memory when possible
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits)

    def _run_cuda(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to(self.device, torch.float32).contiguous()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        dims = [x.shape[0], *self.session.get_outputs()[0].shape[1:]]
        out = None
        if all(isinstance(d, int) for d in dims):  # static output: ORT writes straight into a torch tensor
            out = torch.empty(dims, dtype=torch.float32, device=self.device)
            binding.bind_output(self.output_name, "cuda", self.device.index or 0, np.float32, dims, out.data_ptr())
        else:
            binding.bind_output(self.output_name, "cuda", self.device.index or 0)
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        if out is not None:
            return out
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(self.device)
