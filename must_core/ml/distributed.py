"""The process-group context of a training run: one process, or DDP ranks launched by ``torchrun``.

``torch.distributed`` does all the distributed work (rendezvous, gradient all-reduce through
DistributedDataParallel, collectives). This module only reads the launcher's environment and gives the
training loop the few numbers and collectives it needs, so the single-process path and the DDP path run
the same loop.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from must_core.errors import InvalidConfigError
from must_core.ml.config import BatchLayout as BatchLayout
from must_core.ml.config import batch_layout as batch_layout

# Rank 0 alone evaluates and exports while the other ranks wait at a barrier: the collective timeout must
# outlast a large evaluation set, not the default 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process (world_size 1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op for one process)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on any rank (one host sync)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_environment() -> DistContext:
    """The context ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK (absent: one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_process_group(ctx: DistContext, device: torch.device) -> None:
    """Join the group ``torchrun`` set up: NCCL between GPUs, gloo on CPU."""
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per rank (LOCAL_RANK); CPU ranks share the CPU."""
    if device.type != "cuda" or not ctx.enabled:
        return device
    if ctx.local_rank >= torch.cuda.device_count():
        raise InvalidConfigError(
            f"rank {ctx.rank} wants GPU {ctx.local_rank} but only {torch.cuda.device_count()} are visible"
        )
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)
