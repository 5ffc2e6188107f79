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
import atexit
import os
import signal
import sys
import threading
from typing import Callable, NoReturn

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


def _watch(signals: frozenset) -> None:
    while True:
        signum = signal.sigwait(signals)
        try:
            _thread.interrupt_main(signum)
        except TypeError:  # Python 3.9 (older Slicer): no signum argument; SIGINT semantics
            _thread.interrupt_main()


_watcher: threading.Thread | None = None


def route_signals_through_watcher() -> Callable[[], None]:
    """Block SIGINT/SIGTERM in this (main) thread and deliver them from a watcher thread instead.

    Returns a function that restores the previous signal mask (the CLI calls it when it returns, so
    in-process callers such as tests get their usual Ctrl-C back). Does nothing where POSIX signal
    masks are unavailable (Windows) or off the main thread.
    """
    global _watcher
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return lambda: None
    signals = frozenset(_SIGNALS)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    if _watcher is None or not _watcher.is_alive():
        # the watcher starts with the blocked mask; sigwait takes blocked signals, which is what it needs
        _watcher = threading.Thread(target=_watch, args=(signals,), name="ptqseg-signals", daemon=True)
        _watcher.start()
    return lambda: signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_process(code: int) -> NoReturn:
    """End the CLI process with ``code`` without tearing down native libraries under a running thread.

    A daemon thread that a library leaves inside native code (nnunetv2's sliding-window producer is
    in ``torch.clone`` when Ctrl-C stops the consumer) is ended by Python's finalization with
    ``pthread_exit`` when it next takes the GIL; unwinding through torch's C++ frames then aborts
    the process ("terminate called without an active exception", exit -6 instead of 130). When
    such a thread is alive, run the exit handlers (Ray, temporary folders, logging), flush, and
    leave without finalization; otherwise exit normally.
    """
    others = [t for t in threading.enumerate() if t.daemon and t.is_alive() and t is not _watcher]
    if not others:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
