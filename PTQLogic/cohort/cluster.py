"""Start a local Ray cluster on demand (no dashboard, no usage stats) or join an existing one."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..core.errors import EngineUnavailable, InputError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding PTQLogic/
_started_local = False  # whether connect() last started a cluster on this machine


def import_ray():
    try:
        import ray
    except Exception as exc:  # noqa: BLE001 - a missing or broken install is said in one line
        raise EngineUnavailable(f"segment-batch needs Ray ({type(exc).__name__}: {exc}); try: pip install 'ray>=2.9'") from None
    return ray


def connect(address: str | None, cpus: int, gpus: int | None) -> bool:
    """Make sure Ray is initialised; True when this call started a local cluster (and must shut it down)."""
    global _started_local
    ray = import_ray()
    if ray.is_initialized():  # an embedding program (or a test) already set Ray up
        return False
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # never report usage to anyone
    if address:
        import PTQLogic

        try:  # the cluster's nodes may not have PTQLogic installed: ship this copy with the job
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR,
                     runtime_env={"py_modules": [PTQLogic], "env_vars": _forwarded_env()})
        except ConnectionError as exc:
            raise InputError(f"Cannot reach the Ray cluster at '{address}': {exc}. Start it with `ray start --head` "
                             "or leave out --ray-address to use a local cluster.") from None
        _started_local = False
        return False
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", **_forwarded_env()}})
    _started_local = True
    return True


def _forwarded_env() -> dict[str, str]:
    """Settings the workers read from their environment (``--cpu-float``), passed on to every worker."""
    return {name: os.environ[name] for name in ("PTQSEG_CPU_FLOAT",) if name in os.environ}


def local_cluster() -> bool:
    """True while the Ray session in use is a local cluster started by connect() (workers share this /tmp)."""
    return _started_local and import_ray().is_initialized()


def available_gpus() -> float:
    return float(import_ray().cluster_resources().get("GPU", 0.0))
