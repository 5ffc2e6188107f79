"""Nothing leaves the machine: the switches that keep the libraries PTQLogic uses offline and out of ~.

``import PTQLogic`` calls :func:`stay_offline` before any of those libraries is imported (each reads its
switch once, at import or at start-up). ``Testing/test_no_network.py`` runs every command under
``strace -f`` with a fresh HOME and fails on any non-loopback connection, DNS query or file under ~.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"
# An HTTP proxy on loopback that nothing serves: Ray's dashboard asks cloud metadata servers
# (169.254.169.254, metadata.google.internal) which cloud it runs on, with no switch to turn that off.
# Through this "proxy" those requests fail at once, without a DNS query and without leaving the machine.
NOWHERE_PROXY = f"http://{LOOPBACK}:9"
LOOPBACK_NAMES = f"{LOOPBACK},localhost,::1"


def stay_offline() -> None:
    """Turn off the telemetry of OpenVINO, ONNX Runtime and Ray, and keep matplotlib's caches out of ~."""
    # `import openvino` sends usage telemetry (and writes ~/intel) unless `openvino_telemetry` cannot be
    # imported, in which case OpenVINO uses its own no-op stub.
    sys.modules.setdefault("openvino_telemetry", None)
    # ONNX Runtime's 1DS telemetry: device id + event queue in ~/.cache/Microsoft, uploads to
    # mobile.events.data.microsoft.com. Read when ONNX Runtime initialises; "1" turns all of it off.
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if "MPLCONFIGDIR" not in os.environ and "matplotlib" not in sys.modules:
        sys.meta_path.insert(0, _MatplotlibConfigDir())


def user_cache_root() -> Path:
    """PTQSeg's cache folder: ``$PTQSEG_CACHE_DIR``, else the user cache folder (e.g. ~/.cache/ptqseg)."""
    configured = os.environ.get("PTQSEG_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("ptqseg", appauthor=False))
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptqseg"


class _MatplotlibConfigDir(importlib.abc.MetaPathFinder):
    """MONAI imports matplotlib, which writes ~/.cache/matplotlib and ~/.config/matplotlib unless MPLCONFIGDIR
    is set: on its first import point it at PTQSeg's cache folder (as it is then, after --cache-dir)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - importlib's protocol
        if name == "matplotlib" and "MPLCONFIGDIR" not in os.environ:
            os.environ["MPLCONFIGDIR"] = str(user_cache_root() / "matplotlib")
        return None  # the regular finders import it (this finder stays in place: removing it mid-search skips one)


def ray_local_cluster_env() -> dict[str, str]:
    """Environment for the processes of a local Ray cluster: loopback only, no usage stats, no metrics."""
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        # node IP 127.0.0.1 (on every OS, despite the name): else Ray finds its IP by a UDP connect to 8.8.8.8:53
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_enable_metrics_collection": "0",
        **{name: NOWHERE_PROXY for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")},
        **{name: LOOPBACK_NAMES for name in ("no_proxy", "NO_PROXY")},
    }
