"""Data-parallel plumbing for the Trainer: process group, DDP, rank-0 work.

Launch with ``torchrun --nproc_per_node K ...``; torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``), which
:func:`setup` reads.  Without them the run is a single process and every
function here is a no-op.  The backend is NCCL on CUDA and Gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("cliplab.train")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a data-parallel run.

    Attributes
    ----------
    rank, world_size, local_rank : int
        From torchrun's environment; (0, 1, 0) for a single process.
    device : torch.device
        The device this process trains on.
    owns_group : bool
        True when :func:`setup` created the process group (and
        :func:`cleanup` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def setup(device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun's environment variables.

    Parameters
    ----------
    device : str, default "auto"
        ``"auto"`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else CPU;
        any other value is used as given.

    Returns
    -------
    DistEnv

    Notes
    -----
    On CPU with several processes per machine, each process gets
    ``cores // LOCAL_WORLD_SIZE`` intra-op threads so that the processes do not
    oversubscribe the cores.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistEnv(device=dev)

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
        owns = True
    if dev.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, _cpu_cores() // local_world))
    logger.debug("rank %d/%d on %s, %d threads", rank, world_size, dev, torch.get_num_threads())
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=owns)


def wrap(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when running on several ranks.

    A model holding a module whose class sets ``skips_parameters = True`` (mixture-of-experts
    blocks, where an expert may get no token in a step) is wrapped with
    ``find_unused_parameters=True``, so DDP does not wait for gradients that never come.
    """
    if not env.is_distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    unused = any(getattr(m, "skips_parameters", False) for m in model.modules())
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)


def barrier(env: DistEnv) -> None:
    """Wait for all ranks (no-op for a single process)."""
    if env.is_distributed:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
