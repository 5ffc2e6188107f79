"""User-facing errors. Every message says what is wrong and what to do about it."""


class PTQError(Exception):
    """Base class: the CLI prints ``str(error)`` as one line and exits non-zero."""

    exit_code = 2


class InputError(PTQError):
    """A volume, folder or setting given by the user cannot be used."""


class ModelError(PTQError):
    """A model spec, checkpoint, TorchScript or ONNX file cannot be loaded or exported."""


class EngineUnavailable(PTQError):
    """A runtime (TensorRT, OpenVINO, ONNX Runtime, CUDA) is not installed or cannot run here."""


class AccuracyError(PTQError):
    """A converted or quantized model differs from its reference by more than the tolerance."""


class Cancelled(PTQError):
    """The user cancelled long-running work; nothing partial was left behind."""

    exit_code = 130


class InputWarning(UserWarning):
    """An input that works but probably is not what was meant (the CLI prints ``warning: ...``)."""
