"""The processes of a run: torchrun's process group (or a single process) and the collectives caml uses."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .cli import device_from_flag

__all__ = ["ProcessGroup", "distributed_ready", "all_gather_varsize"]


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_varsize(tensor: Tensor) -> list[Tensor]:
    """``tensor`` of every rank (shapes may differ in dim 0), in rank order; padded to the largest
    for the collective (gloo and NCCL need equal sizes) and trimmed after."""
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return [g[:n] for g, n in zip(gathered, sizes)]


class ProcessGroup:
    """This process's place in the run, from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``; one process without them), and its device (``--device``; NCCL on GPUs, gloo on CPU)."""

    def __init__(self, device_flag: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device_from_flag(device_flag, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.rank == 0

    def set_threads(self, threads: Optional[int]) -> None:
        """``threads`` CPU threads for this process; by default torch's, but under DDP on the CPU a
        share of the cores (the processes would otherwise oversubscribe them)."""
        if threads is not None:
            torch.set_num_threads(threads)
        elif self.device.type == "cpu" and self.world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel when there are several processes (unused parameters
        allowed: the heads take no part in a step without the OCC term)."""
        if self.world == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)

    def all_gather_object(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
