"""Ray for the batch stages: the one place that connects to a cluster (`--ray`, `--ray-address`) and sizes actors.

`--ray-address ADDRESS` takes `auto` (a running cluster on this node), `ray://host:10001` (Ray Client) or a
`host:port` of a head node; `RAY_ADDRESS` works too, as in Ray itself. With neither, the command starts a local
cluster of this machine's cores for its own run and stops it at the end. Ray is an extra
(`pip install 'illust2vec[cluster]'`), imported only here and only when asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import UserError
from .cores import cores

log = logging.getLogger(__name__)
EXTRA = "pip install 'illust2vec[cluster]'"


@dataclass(frozen=True)
class ClusterInfo:
    address: str  # what was connected to ("local" for a cluster started for this run)
    cpus: float
    gpus: float


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray; {EXTRA}") from None
    return ray


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[ClusterInfo]:
    """Connect to the cluster at `address` (or `RAY_ADDRESS`), or start a local one; disconnect at the end.

    A local cluster started here is stopped when the block ends; a cluster that was already running is left
    running. Connecting twice in one process reuses the connection.
    """
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        yield _info(ray, address or "current")
        return
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or cores(), **kwargs)
    except ConnectionError as e:
        raise UserError(f"--ray-address {address}: cannot connect to a Ray cluster ({_first_line(e)})") from None
    except (RuntimeError, ValueError) as e:
        where = f"--ray-address {address}" if address else "--ray"
        raise UserError(f"{where}: Ray did not start ({_first_line(e)})") from None
    try:
        yield _info(ray, address or "local")
    finally:
        ray.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _info(ray, address: str) -> ClusterInfo:
    res = ray.cluster_resources()
    info = ClusterInfo(address, float(res.get("CPU", 0)), float(res.get("GPU", 0)))
    log.info("ray cluster %s: %g CPUs, %g GPUs", info.address, info.cpus, info.gpus)
    return info


def gpus_per_actor(requested: float | None, info: ClusterInfo) -> float:
    """`--gpus-per-actor`: 1 when the cluster has GPUs and 0 when it has none, unless the user chose."""
    if requested is None:
        return 1.0 if info.gpus > 0 else 0.0
    if requested < 0:
        raise UserError(f"--gpus-per-actor must be at least 0, not {requested}")
    if requested > 0 and info.gpus == 0:
        raise UserError(f"--gpus-per-actor {requested:g}: the cluster at {info.address} has no GPUs")
    return float(requested)


def default_actors(requested: int | None, info: ClusterInfo, gpus: float) -> int:
    """`--actors`: one per GPU share when actors take GPUs, else one per two CPUs (decoding needs the rest)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--actors must be at least 1, not {requested}")
        return requested
    if gpus > 0:
        return max(1, int(info.gpus // gpus))
    return max(1, int(info.cpus // 2))
