"""torch.distributed under `torchrun`: joining the process group, and the batch reductions of data-parallel
training (`ProcessGroupReduction`, used by `mtc.data_parallel`).

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; NCCL joins one GPU per rank,
gloo the CPU. Nothing here is used by a single-process run.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .memory import split
from .transcoder import BatchReduction

TIMEOUT_ENV = "MTC_DIST_TIMEOUT_S"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device) after joining torchrun's process group: NCCL with one GPU per
    rank (`LOCAL_RANK`), gloo on CPU. A peer that stops answering fails collectives after `MTC_DIST_TIMEOUT_S`
    seconds (default 600) instead of hanging."""
    if not dist.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
        # torchrun's agent hosts the store and keeps it across restarts (--max-restarts): without a prefix per
        # attempt, a restarted rank reads its peers' addresses from the failed attempt and cannot connect.
        hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not hosted_by_agent, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout, rank=rank,
                                world_size=world, store=dist.PrefixStore(f"mtc/attempt_{attempt}", store))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world, device


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def context_shares(n_contexts: int, model_batch_size: int, world: int) -> list[tuple[int, int]]:
    """Each rank's contiguous `[start, end)` of a fill's contexts, cut at forward-batch boundaries so every
    rank runs exactly the forward batches one process would (and gets bit-identical activations)."""
    chunks = list(range(0, n_contexts, model_batch_size))
    return [(c[0], min(c[-1] + model_batch_size, n_contexts)) if c else (n_contexts, n_contexts)
            for c in split(chunks, world)]


class ProcessGroupReduction(BatchReduction):
    """Reductions over the ranks of the default process group, each holding a share of the batch."""

    def __init__(self):
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()

    def sum(self, t: Tensor) -> Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def min(self, t: Tensor) -> Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def max(self, t: Tensor) -> Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather(self, t: Tensor) -> Tensor:
        t = t.detach().contiguous()
        sizes = [torch.zeros((), dtype=torch.long, device=t.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor(t.shape[0], device=t.device))
        longest = int(max(sizes))
        padded = torch.zeros(longest, *t.shape[1:], dtype=t.dtype, device=t.device)
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:int(n)] for part, n in zip(parts, sizes)])

    def sum_gradients(self, parameters) -> None:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
