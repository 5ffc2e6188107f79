"""Loaded through PYTHONPATH by Testing/test_guarantees.py: any attempt to reach a non-local address
(connect or DNS lookup) is recorded in $PTQSEG_NETGUARD_LOG and fails, so a test can prove that a
command made no network call."""
import os
import socket

_LOG = os.environ.get("PTQSEG_NETGUARD_LOG")
_LOCAL = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")


def _record(what):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as handle:
            handle.write(f"{what}\n")
    raise OSError(f"network access blocked by the PTQSeg test guard: {what}")


def _is_local(address):
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = str(address[0]) if address else ""
    return host in _LOCAL or host.startswith("127.")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    if not _is_local(address):
        _record(f"connect {address!r}")
    return _connect(self, address)


def connect_ex(self, address):
    if not _is_local(address):
        _record(f"connect_ex {address!r}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host or "")
    if not (name in _LOCAL or name.startswith("127.")):
        _record(f"getaddrinfo {name!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
