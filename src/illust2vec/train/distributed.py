"""Distributed set-up for `torchrun`: one process per GPU (NCCL) or per CPU slot (gloo), on one node or several.

Several nodes need no shared filesystem: rank 0 alone reads and writes the run directory (`on_main` hands what it
read to the other ranks, `sync_state` its restored weights), and every rank streams its own part of the shards (the
loader splits them by RANK and WORLD_SIZE). See docs/cluster.md.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    nodes: int = 1  # torchrun's GROUP_WORLD_SIZE: the nodes (agents) that joined the rendezvous

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    # One GPU per local process; more processes than GPUs share them round-robin (gloo only: NCCL refuses that).
    dev = torch.device(f"cuda:{local % torch.cuda.device_count()}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(os.environ.get("I2V_DIST_BACKEND") or ("nccl" if use_cuda else "gloo"))
    return Dist(rank, world, local, dev, nodes)


def describe(d: Dist, out: str) -> str:
    """One line for the log: how many processes on how many nodes, and which host holds the run directory."""
    backend = dist.get_backend() if dist.is_initialized() else "none"
    return f"{d.world} processes on {d.nodes} node(s) ({backend}); rank 0 on {socket.gethostname()} writes {out}"


def on_main(d: Dist, fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 alone, its result handed to every rank: for what only rank 0's node may hold (the run
    directory, when nodes share no filesystem). A UserError raised there is raised on every rank, so that each
    stops with the same one line instead of waiting for rank 0 or failing in the next collective."""
    if not d.enabled:
        return fn()
    box: list = [None]
    if d.main:
        try:
            box = [("ok", fn())]
        except UserError as e:
            box = [("user", str(e))]
        except Exception as e:  # a bug or a broken file: rank 0 raises it, the others stop instead of waiting
            dist.broadcast_object_list([("crash", f"{type(e).__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "user":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def sync_state(d: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Give every rank rank 0's weights, buffers and optimizer state, in place: after rank 0 alone restored a
    checkpoint (DDP copies rank 0's weights once, when it wraps the model, not after)."""
    if not d.enabled:
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)
    if optimizer is not None:
        # Through the CPU: the state's tensors are pickled, and each rank's optimizer moves them to its own device.
        state = optimizer.state_dict() if d.main else None
        if d.main:
            state = {**state, "state": {k: _to_cpu(v) for k, v in state["state"].items()}}
        box = [state]
        dist.broadcast_object_list(box, src=0)
        if not d.main:
            optimizer.load_state_dict(box[0])


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def teardown(d: Dist, finished: bool = False) -> None:
    """Leave the process group. After a clean finish every rank first waits for the others: a gloo rank whose peer
    destroys the group and exits while their connection is still open can abort (SIGABRT, "terminate called without
    an active exception"). After a failure there is no barrier, since a rank that crashed would never reach it."""
    if d.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def gather_arrays(d: Dist, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every rank's arrays (for validation metrics over the whole split); identity on one process."""
    if not d.enabled:
        return arrays
    parts: list = [None] * d.world
    dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def mean_over_ranks(d: Dist, value: float, weight: float) -> float:
    """The weighted mean of a value across ranks (e.g. a loss averaged over the samples each rank saw)."""
    if not d.enabled:
        return value
    t = torch.tensor([value * weight, weight], dtype=torch.float64, device=d.device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def broadcast_object(d: Dist, obj):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
