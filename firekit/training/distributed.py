"""Several processes under ``torchrun``: the process group, each process's device, DDP, averages over
the processes."""

from __future__ import annotations

import os

import torch

__all__ = ["init_distributed", "close_distributed", "process_device", "barrier", "wrap_ddp", "mean_over_processes"]

_OPENED = False  # init_distributed opened the process group (so close_distributed shuts it)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under ``torchrun`` (its environment variables), initialising the
    process group (NCCL with CUDA, else gloo) if needed; (0, 1, 0) in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    global _OPENED
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        _OPENED = True
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def close_distributed() -> None:
    """Shut the process group down when :func:`init_distributed` opened it (a caller's own group is
    left as it is). Left open, its communication threads could outlive the run and a process abort at
    exit ("terminate called without an active exception", seen once in five two-process runs)."""
    global _OPENED
    if not _OPENED:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _OPENED = False


def process_device(device: torch.device, world: int, local_rank: int) -> torch.device:
    """``device``, or with several processes and a CUDA device of no index this process's GPU
    (``cuda:local_rank``, made the current one)."""
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def barrier(world: int) -> None:
    """Wait for every process (nothing in a single process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def wrap_ddp(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel``: the ranks start from rank 0's weights (DDP broadcasts
    them); gradients are averaged."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def mean_over_processes(values: torch.Tensor, world: int) -> torch.Tensor:
    """``values`` averaged over the ``world`` processes in one all-reduce (in float64); as they are in
    a single process."""
    if world <= 1:
        return values
    import torch.distributed as dist

    values = values.double()
    dist.all_reduce(values)
    values /= world
    return values
