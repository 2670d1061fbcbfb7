"""Distributed set-up for `torchrun`: one process per GPU (NCCL) or per CPU slot (gloo), on one node or several."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

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
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    # One GPU per local process; more processes than GPUs share them round-robin (gloo only: NCCL refuses that).
    dev = torch.device(f"cuda:{local % torch.cuda.device_count()}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(os.environ.get("I2V_DIST_BACKEND") or ("nccl" if use_cuda else "gloo"))
    return Dist(rank, world, local, dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
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
