"""Ctrl-C and SIGTERM without signal frames on native threads.

A signal delivered while OpenVINO or ONNX Runtime run native kernels (AMX/AVX-512 state, their own
thread pools) can crash the process: `ptqseg benchmark --runtimes openvino onnxruntime` interrupted
with SIGINT died with "Segmentation fault" (exit 139) before Python's handler ever ran. So the CLI
blocks SIGINT/SIGTERM in its main thread before any engine starts (threads created later inherit
the mask) and one small watcher thread takes them with ``sigwait``, which needs no signal frame. The
watcher then raises the usual exception in the main thread at the next Python bytecode
(``_thread.interrupt_main``): KeyboardInterrupt for Ctrl-C, the installed handler for SIGTERM.
"""
from __future__ import annotations

import _thread
import signal
import threading

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


def _watch(signals: frozenset) -> None:
    while True:
        signum = signal.sigwait(signals)
        try:
            _thread.interrupt_main(signum)
        except TypeError:  # Python 3.9 (older Slicer): no signum argument; SIGINT semantics
            _thread.interrupt_main()


def route_signals_through_watcher() -> bool:
    """Block SIGINT/SIGTERM in this (main) thread and deliver them from a watcher thread instead.

    Returns False (and changes nothing) where POSIX signal masks are unavailable (Windows) or when
    not called from the main thread.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return False
    signals = frozenset(_SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    # the watcher starts with the same mask; sigwait takes blocked signals, which is what it needs
    threading.Thread(target=_watch, args=(signals,), name="ptqseg-signals", daemon=True).start()
    return True
