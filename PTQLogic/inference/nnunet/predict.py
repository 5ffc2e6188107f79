"""nnU-Net's own inference with PTQLogic engines in place of the PyTorch network.

Preprocessing (transpose_forward, crop to nonzero, normalization, resampling), the gaussian sliding
window (nnU-Net's step computation, fp16 accumulation, optional mirroring), fold averaging and the
export back to the input grid are nnunetv2's functions, called as a library. Only three things differ
from ``nnUNetPredictor.initialize_from_trained_model_folder``: names from the plans are resolved through
allow-lists (:mod:`.folder`), the image comes from a :class:`~PTQLogic.core.volume.Volume` (KJI == SimpleITK's
array order), and each fold's network is an :class:`~PTQLogic.engines.base.Engine`.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ...engines.base import Engine
from ...core.errors import InputError, ModelError, PTQError
from ...core.progress import Monitor
from ...core.volume import Volume
from ...models.nnunet.model_dir import NnUNetModel
from .fp32_windows import Fp32Windows, chosen_windows, unsure_share
from .parallel_zoom import as_float64, in_slabs, parallel_zoom

STAGE = "nnU-Net sliding window"


class Stages(NamedTuple):
    """The progress stage names of one prediction."""

    preprocessing: str
    sliding_window: str
    export: str


def stages_for(part: str | None = None) -> Stages:
    """One model: "nnU-Net sliding window", ...; one part of several: "part 2/5 (vertebrae): sliding window", ..."""
    from .export import STAGE as EXPORT

    if part is None:
        return Stages("nnU-Net preprocessing", STAGE, EXPORT)
    return Stages(f"{part}: preprocessing", f"{part}: sliding window", f"{part}: export")


def _resampling_function(name: str, kwargs: dict[str, Any]):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    table = {"resample_data_or_seg_to_shape": resample_data_or_seg_to_shape,
             "resample_torch_fornnunet": resample_torch_fornnunet}
    if name not in table:
        raise ModelError(f"nnU-Net resampling function {name!r} is not supported ({tuple(table)}).")
    return partial(table[name], **kwargs)


def _widened_first(resample):
    """nnunetv2's SciPy resampling converts the whole image to float64 first, on one core (1.3 s of a 512x512x300
    CT on 2 cores); here that copy is made on every core, and the result, computed in float64 as before, is
    rounded to the input's dtype once at the end, as nnunetv2 rounds it into an array of that dtype."""

    def run(data, new_shape, *args, **kwargs):
        if not isinstance(data, np.ndarray) or data.dtype != np.float32:
            return resample(data, new_shape, *args, **kwargs)
        return np.asarray(resample(as_float64(data), new_shape, *args, **kwargs)).astype(np.float32, copy=False)

    return run


def _no_mask(seg: np.ndarray | None, new_shape, *args, **kwargs) -> np.ndarray | None:
    return None if seg is None else np.zeros((seg.shape[0], 1, 1, 1), np.int8)


def _managers(plans: dict[str, Any], configuration: str):
    """nnU-Net's PlansManager/ConfigurationManager with every by-name lookup replaced by an allow-list."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

    from ...models.nnunet.folder import resolve_configuration

    class SafeConfigurationManager(ConfigurationManager):
        @property
        def preprocessor_class(self):
            return DefaultPreprocessor

        @property
        def resampling_fn_data(self):
            name = self.configuration["resampling_fn_data"]
            resample = _resampling_function(name, self.configuration["resampling_fn_data_kwargs"])
            return _widened_first(resample) if name == "resample_data_or_seg_to_shape" else resample

        @property
        def resampling_fn_probabilities(self):
            return _resampling_function(self.configuration["resampling_fn_probabilities"],
                                        self.configuration["resampling_fn_probabilities_kwargs"])

        @property
        def resampling_fn_seg(self):
            # run_case_npy also resamples its nonzero mask, which nothing here reads (1.2 s of a 512x512x300 CT's
            # 10 s on 2 cores): an empty mask instead, same data and properties
            return _no_mask

    class SafePlansManager(PlansManager):
        @property
        def label_manager_class(self):
            return LabelManager

        @property
        def image_reader_writer_class(self):
            raise ModelError("Images are read by PTQLogic, not by nnU-Net's reader classes.")

        def get_configuration(self, configuration_name: str):
            return SafeConfigurationManager(resolve_configuration(self.plans, configuration_name))

    plans_manager = SafePlansManager(plans)
    return plans_manager, plans_manager.get_configuration(configuration)


def _preprocessor():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization, NoNormalization, RescaleTo01Normalization, RGBTo01Normalization, ZScoreNormalization,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    schemes = {c.__name__: c for c in (CTNormalization, NoNormalization, RescaleTo01Normalization,
                                        RGBTo01Normalization, ZScoreNormalization)}

    class SafePreprocessor(DefaultPreprocessor):
        def _normalize(self, data, seg, configuration_manager, foreground_intensity_properties_per_channel):
            for c in range(data.shape[0]):  # DefaultPreprocessor._normalize, with a fixed table of schemes
                scheme = schemes[configuration_manager.normalization_schemes[c]]
                normalizer = scheme(use_mask_for_norm=configuration_manager.use_mask_for_norm[c],
                                    intensityproperties=foreground_intensity_properties_per_channel[str(c)])
                if scheme is CTNormalization and data.dtype == normalizer.target_dtype:
                    # clip and scale with fixed numbers, element by element, in place: in slabs on every core
                    in_slabs(lambda image: normalizer.run(image), (data[c],))
                else:
                    data[c] = normalizer.run(data[c], seg[0])
            return data

    return SafePreprocessor(verbose=False)


class _EngineNetwork(torch.nn.Module):
    """Looks like nnU-Net's network to its predictor; runs the current fold's engine and reports progress.

    ``transient``: the caller uses each window's logits before it asks for the next (the blending predictor
    without mirroring), so an engine that offers ``forward_transient`` hands out its own output buffer instead of
    a copy: a 117-class 128x112x112 window is 750 MB, and copying it cost 0.5 s a window on 2 cores."""

    def __init__(self, monitor: Monitor, channels: int, stage: str = STAGE, transient: bool = False,
                 fp32_windows: Fp32Windows | None = None):
        super().__init__()
        self.engine: Engine | None = None
        self.fp32_windows = fp32_windows
        self.transient = transient
        self.monitor = monitor
        self.stage = stage
        self.channels = channels
        self.calls = 0
        self.extra_calls = 0  # the FP32 windows' calls (INT8 again and FP32)
        self.total = 1
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.monitor.check()
        started = time.perf_counter()
        call = getattr(self.engine, "forward_transient", self.engine) if self.transient else self.engine
        try:
            logits = call(x.to(device=self.engine.device, dtype=torch.float32).contiguous())
        except PTQError:
            raise
        except Exception as exc:
            raise ModelError(f"The engine failed on a patch of shape {tuple(x.shape)}: {exc}") from exc
        self.seconds += time.perf_counter() - started
        expected = (x.shape[0], self.channels, *x.shape[2:])
        if tuple(logits.shape) != expected:
            raise ModelError(f"The engine returned logits of shape {tuple(logits.shape)} for a patch of "
                             f"{tuple(x.shape)}; nnU-Net expects {expected} (classes from dataset.json).")
        self.calls += 1
        self.monitor.update(self.stage, min(self.calls, self.total), self.total)
        return logits.to(device=x.device, dtype=torch.float32)


class PredictedLogits(NamedTuple):
    """One model's sliding-window result on the network grid, before the export."""

    logits: torch.Tensor  # (classes, *network grid), fp16 as nnU-Net accumulates them
    properties: dict[str, Any]  # nnU-Net's preprocessing properties (cropping, spacing) for the export
    seconds: float  # preprocessing (if done here) and sliding window (FP32 engine builds left out)
    network_seconds: float  # in the engines only
    patches: int  # network calls of the sliding window (FP32 windows' calls not counted)
    fp32_windows: Fp32Windows | None = None  # what ran again in FP32 (``--fp32-windows``)


@dataclass
class NnUNetPrediction:
    labels: np.ndarray  # (K, J, I) on the input grid
    probabilities: np.ndarray | None  # (classes, K, J, I) when asked for
    seconds: float
    network_seconds: float
    patches: int


class NnUNetRunner:
    """One nnU-Net model (plans + dataset.json + configuration) run with any engines (one per fold)."""

    def __init__(self, plans: dict[str, Any], dataset: dict[str, Any], configuration: str,
                 mirror_axes: Sequence[int] | None = None, step_size: float = 0.5):
        import nnunetv2.inference.export_prediction  # noqa: F401 (imported now, not inside a timed prediction)
        import nnunetv2.inference.predict_from_raw_data  # noqa: F401
        from nnunetv2.utilities.label_handling.label_handling import LabelManager

        if not 0 < step_size <= 1:
            raise InputError(f"Sliding-window step size must be in (0, 1], got {step_size}.")
        self.plans, self.dataset, self.configuration = plans, dataset, configuration
        self.plans_manager, self.config = _managers(plans, configuration)
        self.label_manager = LabelManager(label_dict=dataset["labels"], regions_class_order=None)
        self.mirror_axes = tuple(mirror_axes) if mirror_axes is not None else None
        self.step_size = step_size

    def __reduce__(self):  # the plans manager's class is made per call: a process gets the runner rebuilt
        return type(self), (self.plans, self.dataset, self.configuration, self.mirror_axes, self.step_size)

    @property
    def in_channels(self) -> int:
        return len(self.dataset.get("channel_names", self.dataset.get("modality", {})))

    def preprocess(self, volume: Volume) -> tuple[np.ndarray, dict[str, Any]]:
        """nnU-Net's preprocessed (C, *network axes) float32 array and its properties dict."""
        volume.validate("input volume")
        data = volume.array[None] if volume.array.ndim == 3 else volume.array
        if data.shape[0] != self.in_channels:
            raise InputError(f"The nnU-Net model takes {self.in_channels} channel(s) "
                             f"({', '.join(map(str, self.dataset.get('channel_names', {}).values()))}); "
                             f"the input has {data.shape[0]}.")
        # SimpleITKIO's convention: array (z, y, x) == Volume's KJI, spacing reversed to (z, y, x)
        properties = {"spacing": [abs(float(s)) for s in volume.spacing[::-1]]}
        with contextlib.redirect_stdout(io.StringIO()), parallel_zoom():
            data, _, properties = _preprocessor().run_case_npy(
                np.asarray(data, dtype=np.float32), None, properties, self.plans_manager, self.config, self.dataset)
        return data, properties

    def preprocess_key(self) -> str:
        """Equal for two models exactly when :meth:`preprocess` gives them the same array for any volume: the
        plans' transpose, target spacing, normalization (schemes, masks, intensity properties) and resampling."""
        config = self.config.configuration
        fields = {"transpose": list(self.plans_manager.transpose_forward), "spacing": list(self.config.spacing),
                  "normalization": list(self.config.normalization_schemes),
                  "use_mask_for_norm": list(self.config.use_mask_for_norm),
                  "intensities": self.plans_manager.foreground_intensity_properties_per_channel,
                  "resampling": [config["resampling_fn_data"], config["resampling_fn_data_kwargs"]],
                  "channels": self.in_channels}
        return json.dumps(fields, sort_keys=True, default=str)

    def predict(self, volume: Volume, engines: Sequence[Engine], *, mirroring: bool = False,
                return_probabilities: bool = False, monitor: Monitor | None = None,
                preprocessed: tuple[np.ndarray, dict[str, Any]] | None = None,
                stages: Stages | None = None) -> NnUNetPrediction:
        """``preprocessed``: this volume's :meth:`preprocess` result, made for a model of the same
        :meth:`preprocess_key` (read only; it is not preprocessed again); ``stages``: progress stage names."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        monitor = monitor or Monitor()
        stages = stages or stages_for()
        predicted = self.predict_logits(volume, engines, mirroring=mirroring, monitor=monitor,
                                        preprocessed=preprocessed, stages=stages)
        labels, seconds = self.export(predicted, monitor, stages.export)
        probabilities = None
        if return_probabilities:
            with contextlib.redirect_stdout(io.StringIO()):
                _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
                    predicted.logits, self.plans_manager, self.config, self.label_manager, predicted.properties,
                    return_probabilities=True)
        monitor.check()
        return NnUNetPrediction(labels=labels, probabilities=probabilities, seconds=predicted.seconds + seconds,
                                network_seconds=predicted.network_seconds, patches=predicted.patches)

    def predict_logits(self, volume: Volume, engines: Sequence[Engine], *, mirroring: bool = False,
                       monitor: Monitor | None = None, preprocessed: tuple[np.ndarray, dict[str, Any]] | None = None,
                       stages: Stages | None = None, fp32_windows: Fp32Windows | None = None) -> PredictedLogits:
        """The first half of :meth:`predict`: preprocessing (unless given) and the sliding window; with
        ``fp32_windows`` (CPU engines), the windows INT8 is least sure of are taken from FP32 (:mod:`.fp32_windows`)."""
        monitor = monitor or Monitor()
        stages = stages or stages_for()
        if not engines:
            raise ModelError("No engines were given (one per fold is needed).")
        started = time.perf_counter()
        if preprocessed is None:
            monitor.update(stages.preprocessing, 0, 1)
            preprocessed = self.preprocess(volume)
            monitor.update(stages.preprocessing, 1, 1)
        data, properties = preprocessed[0], dict(preprocessed[1])
        del preprocessed
        # mirroring adds a flipped window's logits to the first window's, which must then be a copy of its own
        device = _engines_device(engines)
        if fp32_windows is not None and (device is None or device.type != "cpu"):
            raise InputError("--fp32-windows takes FP32 windows on CPU engines (OpenVINO, ONNX Runtime); "
                             "leave it out on a GPU.")
        network = _EngineNetwork(monitor, self.label_manager.num_segmentation_heads, stages.sliding_window,
                                 transient=not mirroring, fp32_windows=fp32_windows)
        predictor = self._predictor(network, mirroring, device)
        network.total = self._count_windows(predictor, data.shape[1:], mirroring) * len(engines)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                logits = _predict_logits(predictor, network, engines, torch.from_numpy(data))
        finally:
            if fp32_windows is not None:
                fp32_windows.release()
        built = fp32_windows.build_seconds if fp32_windows is not None else 0.0
        counted = network.calls - network.extra_calls
        return PredictedLogits(logits, properties, time.perf_counter() - started - built, network.seconds, counted,
                               fp32_windows)

    def export(self, predicted: PredictedLogits, monitor: Monitor | None = None,
               stage: str | None = None) -> tuple[np.ndarray, float]:
        """The second half of :meth:`predict`: the label map on the input grid, and its seconds. It only reads
        ``predicted``, so it can run in another thread while the next part's sliding window runs."""
        from .export import STAGE as EXPORT, logits_to_labels

        started = time.perf_counter()
        labels = logits_to_labels(predicted.logits, self.plans_manager, self.config, self.label_manager,
                                  predicted.properties, monitor or Monitor(), stage or EXPORT)
        return np.asarray(labels), time.perf_counter() - started

    def _predictor(self, network: _EngineNetwork, mirroring: bool, device: torch.device | None = None):
        """nnU-Net's predictor around ``network``. On a GPU (every fold's engine there) it keeps the volume, the
        windows and the blended sums on the GPU, as nnunetv2 does with ``perform_everything_on_device``: blending
        a window's logits on the CPU after copying them from the GPU took most of a whole-CT run on an H100."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        device = device if device is not None and device.type == "cuda" else torch.device("cpu")
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = _blending_predictor(nnUNetPredictor)(
                tile_step_size=self.step_size, use_gaussian=True, use_mirroring=mirroring,
                perform_everything_on_device=device.type == "cuda", device=device, verbose=False, allow_tqdm=False)
            predictor.manual_initialization(network, self.plans_manager, self.config, None, self.dataset,
                                            "PTQLogic", self.mirror_axes)
        return predictor

    def _count_windows(self, predictor, shape: tuple[int, ...], mirroring: bool) -> int:
        padded = [max(s, p) for s, p in zip(shape, self.config.patch_size)]
        windows = len(predictor._internal_get_sliding_window_slicers(tuple(padded)))
        axes = len(self.mirror_axes) if (mirroring and self.mirror_axes) else 0
        return windows * (2 ** axes)


def add_in_slabs(total: torch.Tensor, window: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """``total += window * weight`` (``weight``: one value per voxel, none: 1) one slab of the first spatial axis
    at a time. Each element gets the same float32 product and the same sum as the two whole-array steps, but
    when the two are laid out differently (class-major half-precision sums, channels-last logits from OpenVINO)
    each slab's strided reads stay in cache (5x faster for a 118-class 128x112x112 window on 2 cores), the
    window is read once, and it is never written: it may be an engine's own output buffer."""
    product = None
    for index in range(window.shape[1]):
        if weight is None:
            total[:, index].add_(window[:, index])
            continue
        product = torch.mul(window[:, index], weight[index], out=product)
        total[:, index].add_(product)


@cache
def _blending_predictor(base):
    """nnU-Net's predictor whose CPU sliding window (``perform_everything_on_device=False``) adds each window with
    :func:`add_in_slabs` and divides the sums class by class; everything else as nnunetv2 2.5+ computes it (same
    gaussian, half-precision sums, division and inf check, tested bit for bit against it)."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    class BlendingPredictor(base):
        @torch.inference_mode()
        def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):
            if do_on_device and self.device.type != "cpu":
                return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
            cpu = torch.device("cpu")
            data = data.to(cpu)
            logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half)
            counts = torch.zeros(data.shape[1:], dtype=torch.half)
            gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                        value_scaling_factor=10, device=cpu) if self.use_gaussian else 1
            fp32 = self.network.fp32_windows
            shares = []
            for window in slicers:
                patch = torch.clone(data[window][None], memory_format=torch.contiguous_format).to(self.device)
                prediction = self._internal_maybe_mirror_and_predict(patch)[0].to(cpu)
                if fp32 is not None:
                    shares.append(unsure_share(prediction, fp32.policy.margin, fp32.policy.stride))
                add_in_slabs(logits[window], prediction, gaussian if self.use_gaussian else None)
                counts[window[1:]] += gaussian
            if fp32 is not None:
                self._take_fp32_windows(data, slicers, shares, logits, gaussian if self.use_gaussian else None)
            for sums in logits:  # one class at a time: its division and inf check stay in cache
                torch.div(sums, counts, out=sums)
                if torch.isinf(sums).any():
                    raise RuntimeError("Encountered inf in predicted array (nnU-Net's half-precision sums).")
            return logits

        def _take_fp32_windows(self, data, slicers, shares, logits, gaussian) -> None:
            """Replace the chosen windows' INT8 logits in the blended sums by FP32's: INT8 runs again (its logits
            are not kept: a 117-class window is 750 MB) and the weighted difference is added."""
            fp32, network = self.network.fp32_windows, self.network
            chosen = chosen_windows(shares, fp32.policy)
            fp32.record(shares, chosen)
            if not chosen:
                return
            calls = len(self.allowed_mirroring_axes or ()) if self.use_mirroring else 0
            network.total += 2 * len(chosen) * 2 ** calls
            int8_engine, fp32_engine = network.engine, fp32.engine()
            before = network.calls
            try:
                for index in chosen:
                    window = slicers[index]
                    patch = torch.clone(data[window][None], memory_format=torch.contiguous_format)
                    int8 = self._internal_maybe_mirror_and_predict(patch)[0].to(torch.float32, copy=True)
                    network.engine = fp32_engine
                    difference = self._internal_maybe_mirror_and_predict(patch)[0].to(torch.float32) - int8
                    network.engine = int8_engine
                    add_in_slabs(logits[window], difference, gaussian)
            finally:
                network.engine = int8_engine
                network.extra_calls += network.calls - before

    return BlendingPredictor


def _engines_device(engines: Sequence[Engine]) -> torch.device | None:
    """The device all engines run on, or None when they differ."""
    devices = {str(getattr(engine, "device", "cpu")) for engine in engines}
    return torch.device(devices.pop()) if len(devices) == 1 else None


def runner_for(model: NnUNetModel) -> NnUNetRunner:
    """nnU-Net's preprocessing, sliding window and export for ``model``'s plans and configuration."""
    return NnUNetRunner(model.plans, model.dataset, model.configuration, model.mirror_axes, model.step_size)


@torch.inference_mode()
def _predict_logits(predictor, network: _EngineNetwork, engines: Sequence[Engine], data: torch.Tensor) -> torch.Tensor:
    """``nnUNetPredictor.predict_logits_from_preprocessed_data`` with one engine per fold instead of weights."""
    from nnunetv2.configuration import default_num_processes

    threads = torch.get_num_threads()
    torch.set_num_threads(default_num_processes if default_num_processes < threads else threads)
    try:
        prediction = None
        for fold, engine in enumerate(engines):
            network.engine = engine
            if network.fp32_windows is not None:
                network.fp32_windows.fold = fold
            if prediction is None:
                prediction = predictor.predict_sliding_window_return_logits(data).to("cpu")
            else:
                prediction += predictor.predict_sliding_window_return_logits(data).to("cpu")
        if len(engines) > 1:
            prediction /= len(engines)
    finally:
        torch.set_num_threads(threads)
    return prediction
