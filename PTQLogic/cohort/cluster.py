"""Start a local Ray cluster on demand (loopback only, nothing reported, no dashboard UI) or join an existing one."""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Iterator

from ..core.errors import EngineUnavailable, InputError
from ..core.offline import LOOPBACK, ray_local_cluster_env

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding PTQLogic/
LOOPBACK_TIMEOUT_S = 2.0
_started_local = False  # whether connect() last started a cluster on this machine


def import_ray():
    try:
        import ray
    except Exception as exc:  # noqa: BLE001 - a missing or broken install is said in one line
        raise EngineUnavailable(f"segment-batch needs Ray ({type(exc).__name__}: {exc}); try: pip install 'ray>=2.9'") from None
    return ray


def check_loopback(timeout: float = LOOPBACK_TIMEOUT_S) -> None:
    """Refuse at once when this machine's loopback network is down (Ray would retry its GCS for minutes)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind((LOOPBACK, 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=timeout):
                pass
    except OSError as exc:
        raise EngineUnavailable(
            f"segment-batch starts a local Ray cluster that talks over the loopback network ({LOOPBACK}), and "
            f"it is not usable here ({exc.strerror or exc}). Bring the loopback interface up (ip link set lo up), "
            "or give --ray-address of a running Ray cluster.") from None


def connect(address: str | None, cpus: int, gpus: int | None) -> bool:
    """Make sure Ray is initialised; True when this call started a local cluster (and must shut it down)."""
    global _started_local
    if "ray" in sys.modules and import_ray().is_initialized():  # an embedding program (or a test) set Ray up
        return False
    if address:
        _join(address)
        _started_local = False
        return False
    check_loopback()
    _use_private_token()
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with _loopback_only():
        ray = import_ray()
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK,
                 runtime_env={"env_vars": {"PYTHONPATH": path, **_forwarded_env()}})
    _started_local = True
    return True


def _join(address: str) -> None:
    import PTQLogic

    ray = import_ray()
    try:  # the cluster's nodes may not have PTQLogic installed: ship this copy with the job
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env={"py_modules": [PTQLogic], "env_vars": _forwarded_env()})
    except ConnectionError as exc:
        raise InputError(f"Cannot reach the Ray cluster at '{address}': {exc}. Start it with `ray start --head` "
                         "or leave out --ray-address to use a local cluster.") from None


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While Ray starts its processes (they keep this environment): loopback addresses, no metadata or metrics.

    Ray reads the node-IP switch when it is imported; a Ray imported earlier (by an embedding program)
    is told through the constant that switch sets.
    """
    values = ray_local_cluster_env()
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    constants = sys.modules.get("ray._private.ray_constants")
    cluster_flag = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if cluster_flag is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if cluster_flag is not None:
            constants.ENABLE_RAY_CLUSTER = cluster_flag
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _use_private_token() -> None:
    """Ray 2.5x protects a local cluster with a token it writes to ~/.ray/auth_token: keep one in this process's
    environment instead (Ray's processes and workers inherit it; nothing is written to ~). Kept for the process
    life: a second cluster started by this process reuses it. A user's own RAY_AUTH_* settings win."""
    if not any(os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        raylet = sys.modules.get("ray._raylet")
        if raylet is not None:  # a Ray imported earlier read its settings then: have it read them again
            raylet.Config.initialize("")
            raylet.AuthenticationTokenLoader.instance().reset_cache()


def _forwarded_env() -> dict[str, str]:
    """Settings the workers read from their environment (``--cpu-float``), passed on to every worker."""
    return {name: os.environ[name] for name in ("PTQSEG_CPU_FLOAT",) if name in os.environ}


def local_cluster() -> bool:
    """True while the Ray session in use is a local cluster started by connect() (workers share this /tmp)."""
    return _started_local and import_ray().is_initialized()


def available_gpus() -> float:
    return float(import_ray().cluster_resources().get("GPU", 0.0))
