"""The process's place in a job started by torchrun: rank, world size, device, collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from burrow.errors import UserError


@dataclass(frozen=True)
class Runtime:
    """Who this process is. A plain `python -m burrow` run is rank 0 of a world of 1."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes metrics, plots and single-file checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of `value` over all ranks (itself when alone)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (e.g. a signal seen by one of them)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (this process's GPU under torchrun) when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but no CUDA GPU is available; use cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def launched_world_size() -> int:
    """The number of processes torchrun started (1 for a plain `python -m burrow`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_runtime(device_name: str, parallel: str = "none") -> Runtime:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...), if any.

    DDP and FSDP2 need a process group even in a world of one: under torchrun it joins the
    rendezvous, and a `--parallel ddp|fsdp` run started without torchrun (e.g. resuming a
    multi-process run on a laptop) gets a single-process group of its own, held in memory.
    """
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if (world_size > 1 or parallel != "none") and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size > 1 or "MASTER_ADDR" in os.environ:  # torchrun's rendezvous
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown(clean: bool = True) -> None:
    """Leave the process group, if this process joined one.

    After a clean run the ranks first wait for each other, so that none tears down its
    connections while a peer still uses them; after an error they don't (a peer may be gone).
    """
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
