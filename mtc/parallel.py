"""Several processes under `torchrun`: the process group, the reductions over a batch shared between ranks, and
the activation stores of data- and layer-parallel training.

    torchrun --standalone --nproc-per-node 8 -m mtc train --preset gemma2-2b-l17     # data-parallel: one run
    torchrun --nproc-per-node 2 -m mtc train --layers all ...                        # layer-parallel: a set

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; NCCL joins one GPU per rank, gloo the
CPU. A launch calls `join` once (the one place the rank is decided), `store_for` once per store, and `leave` at
the end. A single process gets `Process()` with `LOCAL`, whose reductions are the identity.

**Data-parallel** (`DataParallelStore`, `ProcessGroupReduction`): every rank trains the same transcoder(s) on its
share of each batch. In every buffer fill all ranks read the same contexts and shuffle the fill's rows with the
same seed, but each runs the language model only on its contiguous share of the contexts. Batch `b` is the same
`batch_size` rows as in one process; each rank holds the rows it computed, about `batch_size / world` of them.
The transcoder step then works on the whole batch through the reduction: BatchTopK keeps the `k * batch_size`
largest pre-activations of the **whole** batch (not of each rank's share: per-rank selection would change what
the loss is, and the result with the number of ranks), the FVUs and AuxK are normalised by the whole batch's
variance, L0, the firing counters and the threshold estimate come from the whole batch, and each rank's gradient
is its part of the whole batch's gradient; they are summed before clipping, so every rank takes the same Adam
step and the weights stay identical. The run equals the single-process run up to floating-point summation order.
Rank 0 alone writes config.json, metrics, W&B, checkpoints, samples (of its own rows), `final/` and the mirror;
every rank reads the checkpoints to resume, so the run dir must be on a filesystem they all see.

**Layer-parallel** (`LayerParallelStore`): each rank owns some of a set's pass's layers and trains them; the
language model's work is shared. In every fill each rank runs the language model on its contiguous share of the
contexts (whole forward batches of `model_batch_size` contexts) for every hook of the pass, and an all-to-all
sends each hook's rows to the rank that owns the hook. Received rows are put back in context order, so each rank
holds exactly the fill a single process would hold for its layers: same rows, same shuffle, same batches, and each
layer trains exactly as it would alone (bit for bit, the forward batches being the same). A pass of N ranks holds
N times the layers of one device. Each rank writes its own layers' run dirs; rank 0 writes `set.json`. Every rank
resumes from the newest checkpoint step that every rank holds (`held_by_every_rank`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from .activations import ActivationStore, build_store
from .config import TranscoderConfig, resolve_device
from .kernels import batch_topk_indices

TIMEOUT_ENV = "MTC_DIST_TIMEOUT_S"


def split(items: list, parts: int) -> list[list]:
    """`items` cut into `parts` contiguous runs, the first ones one longer when they do not divide evenly."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


# ---------------------------------------------------------------------- reductions over the batch
class BatchReduction:
    """Sums, extremes and selections over the whole training batch. In one process the batch is all here, so
    every method is the plain single-process computation; `ProcessGroupReduction` works over ranks that each hold
    a share of the batch, so every rank computes the whole batch's losses and statistics."""

    world_size, rank = 1, 0

    @property
    def whole_batch(self) -> bool:
        """Whether this process holds the whole batch (the dense reference maths needs it)."""
        return self.world_size == 1

    def sum(self, t: Tensor) -> Tensor:
        return t

    def min(self, t: Tensor) -> Tensor:
        return t

    def max(self, t: Tensor) -> Tensor:
        return t

    def gather(self, t: Tensor) -> Tensor:
        """The rows of `t` of every rank, concatenated in rank order."""
        return t

    def sum_gradients(self, parameters) -> None:
        """Sum every parameter's gradient over the ranks (each holds its part of the batch loss's)."""

    def count(self, rows: Tensor) -> int:
        """How many rows the whole batch holds, of which `rows` are this share."""
        return rows.shape[0]

    def total_variance(self, y: Float[Tensor, "batch d"]) -> Tensor:
        """`sum((y - mean_batch(y))^2)` over the whole batch, the denominator of the FVU."""
        return (y - y.mean(0)).pow(2).sum()

    def batch_topk(self, pre_acts: Float[Tensor, "batch d_sae"], k: int) -> tuple[Tensor, Tensor]:
        """BatchTopK: this share's `(tokens, latents)` among the `k * batch` largest entries of the whole batch."""
        return batch_topk_indices(pre_acts, k)

    def fired(self, latents: Tensor, d_sae: int) -> Tensor:
        """The latents that fired anywhere in the batch, given `latents` (with repeats) that fired in this share."""
        return latents


LOCAL = BatchReduction()


class ProcessGroupReduction(BatchReduction):
    """Reductions over the ranks of the default process group, each holding a share of the batch."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

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

    def count(self, rows: Tensor) -> int:
        return int(self.sum(torch.tensor(rows.shape[0], device=rows.device)))

    def total_variance(self, y: Float[Tensor, "batch d"]) -> Tensor:
        mean = self.sum(y.sum(0)) / self.sum(y.new_tensor(float(y.shape[0])))
        return self.sum((y - mean).pow(2).sum())

    def batch_topk(self, pre_acts: Float[Tensor, "batch d_sae"], k: int) -> tuple[Tensor, Tensor]:
        """Every rank offers its own largest candidates; the `k * batch`-th largest of all of them is the
        threshold. Zero entries are never kept (they would be inert picks)."""
        n_keep = k * self.count(pre_acts)
        flat = pre_acts.flatten()
        candidates = flat.topk(min(n_keep, flat.numel()), sorted=False).values
        everyone = self.gather(candidates)
        threshold = everyone.topk(min(n_keep, everyone.numel()), sorted=False).values.min()
        above = (flat > threshold) & (flat > 0)
        tied = ((flat == threshold) & (flat > 0)).nonzero().squeeze(1)
        # exactly k * batch entries, as one process keeps: entries equal to the threshold (duplicated tokens
        # give exact ties) are handed out in rank order
        n_tied = self.gather(torch.tensor([len(tied)], device=flat.device))
        wanted = n_keep - int(self.sum(above.sum()))
        before = int(n_tied[:self.rank].sum())
        kept = torch.cat([above.nonzero().squeeze(1), tied[:max(0, min(len(tied), wanted - before))]])
        return kept // pre_acts.shape[1], kept % pre_acts.shape[1]

    def fired(self, latents: Tensor, d_sae: int) -> Tensor:
        anywhere = self.max(torch.zeros(d_sae, device=latents.device).index_fill_(0, latents, 1))
        return anywhere.nonzero().squeeze(1)


# ---------------------------------------------------------------------- the process group
@dataclass
class Process:
    """This process of a launch: its rank among `world` processes, its device, and the reduction its Trainer
    sums over the batch with (`LOCAL` unless the batch is shared between ranks)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    reduction: BatchReduction = LOCAL

    @property
    def writer(self) -> bool:
        """Whether this process writes the launch's shared files (rank 0 alone does)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether `torchrun` started this process as one of several."""
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
    """Leave the default process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def join(device: str) -> Process:
    """This process: a member of torchrun's process group when launched by `torchrun` (then on its own GPU
    under NCCL), else the single process of the launch. `device` may be "auto"."""
    device = resolve_device(device)
    if not launched_by_torchrun():
        return Process(device=device)
    rank, world, device = init_process_group(device)
    return Process(rank, world, device, ProcessGroupReduction(rank, world))


def leave(process: Process) -> None:
    """Leave the process group `join` joined (nothing to do for a single process)."""
    if process.world > 1:
        leave_process_group()


# ---------------------------------------------------------------------- the stores
def context_shares(n_contexts: int, model_batch_size: int, world: int) -> list[tuple[int, int]]:
    """Each rank's contiguous `[start, end)` of a fill's contexts, cut at forward-batch boundaries so every
    rank runs exactly the forward batches one process would (and gets bit-identical activations)."""
    chunks = list(range(0, n_contexts, model_batch_size))
    return [(c[0], min(c[-1] + model_batch_size, n_contexts)) if c else (n_contexts, n_contexts)
            for c in split(chunks, world)]


class DataParallelStore(ActivationStore):
    """An `ActivationStore` for one rank: the same fills and batches as one process, of which it computes and
    serves only the rows of its share of the contexts."""

    def __init__(self, *args, rank: int, world: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world = rank, world
        self._rows = (0, 0)

    def activations(self, tokens: Tensor, keep: Tensor) -> dict[str, Tensor]:
        start, end = context_shares(len(tokens), self.model_batch_size, self.world)[self.rank]
        first_row = int(keep[:start].sum())
        self._rows = (first_row, first_row + int(keep[start:end].sum()))
        if end > start:
            return super().activations(tokens[start:end], keep[start:end])
        widths = self.run_model(tokens[:1]) if len(tokens) else {}  # a rank without contexts still needs the widths
        return {hook: torch.empty(0, out.shape[-1], dtype=self.dtype, device=self.buffer_device)
                for hook, out in widths.items()}

    def _compute_fill(self, fill_index: int, batches_before: int):
        fill = super()._compute_fill(fill_index, batches_before)
        fill.rows = self._rows  # which rows of the fill (in context order) this rank holds
        return fill

    def held_rows(self, fill, rows: Tensor) -> tuple[Tensor, Tensor]:
        first, end = fill.rows
        mine = rows[(rows >= first) & (rows < end)]
        return mine, mine - first


class LayerParallelStore(ActivationStore):
    """An `ActivationStore` for one rank: computes every hook of `all_pairs` on its share of each fill's
    contexts, exchanges rows with the other ranks, and serves only `owned[rank]`'s pairs."""

    def __init__(self, bridge, make_contexts, all_pairs: list[tuple[str, str]], owned: list[list[tuple[str, str]]],
                 *, rank: int, world: int, **kwargs):
        super().__init__(bridge, make_contexts, all_pairs, **kwargs)
        self.rank, self.world = rank, world
        if len(owned) != self.world or not all(owned):
            raise ValueError(f"layer-parallel training needs at least one layer per rank in every pass; this pass "
                             f"has {len(all_pairs)} layers for {self.world} ranks. Use fewer processes")
        self.owned_hooks = [list(dict.fromkeys(h for pair in pairs for h in pair)) for pairs in owned]
        self.hook_pairs = [tuple(pair) for pair in owned[self.rank]]

    def activations(self, tokens: Tensor, keep: Tensor) -> dict[str, Tensor]:
        shares = context_shares(len(tokens), self.model_batch_size, self.world)
        lo, hi = shares[self.rank]
        mine = super().activations(tokens[lo:hi], keep[lo:hi]) if hi > lo else {}
        widths = {hook: acts.shape[-1] for hook, acts in mine.items()}
        widths = self._agree_widths(widths)
        rows = [int(keep[a:b].sum()) for a, b in shares]
        send = [self._columns(mine, hooks, rows[self.rank], widths) for hooks in self.owned_hooks]
        own = self.owned_hooks[self.rank]
        width = sum(widths[h] for h in own)
        # one flat exchange with a split per rank: rows and widths differ between ranks (gloo's list form
        # wants equal shapes)
        sizes = [n * width for n in rows]
        received = torch.empty(sum(sizes), dtype=self.dtype, device=self.buffer_device)
        dist.all_to_all_single(received, torch.cat([t.flatten() for t in send]), sizes, [t.numel() for t in send])
        joined = received.view(-1, width) if width else received.view(sum(rows), 0)
        out, column = {}, 0
        for hook in own:
            out[hook] = joined[:, column:column + widths[hook]].contiguous()
            column += widths[hook]
        return out

    def _agree_widths(self, widths: dict[str, int]) -> dict[str, int]:
        """Every hook's width, known on every rank (a rank with no contexts in a fill computed none)."""
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, widths)
        return {hook: width for found in gathered for hook, width in found.items()}

    def _columns(self, acts: dict[str, Tensor], hooks: list[str], n: int, widths: dict[str, int]) -> Tensor:
        if not acts:
            return torch.empty(0, sum(widths[h] for h in hooks), dtype=self.dtype, device=self.buffer_device)
        return torch.cat([acts[h] for h in hooks], dim=1).contiguous()


def store_for(bridge, configs: list[TranscoderConfig], process: Process,
              layer_parallel: bool = False) -> tuple[ActivationStore, list[TranscoderConfig]]:
    """The activation store that feeds `configs` in this process, and the configs this process trains: all of
    them from an `ActivationStore` in a single process, all of them from a `DataParallelStore` (its share of
    every batch) for a run under torchrun, and its contiguous share of them from a `LayerParallelStore` for a
    set's pass under torchrun (`layer_parallel`)."""
    if process.world == 1:
        return build_store(bridge, configs, buffer_device=process.device), configs
    if not layer_parallel:
        return build_store(bridge, configs, buffer_device=process.device, store_type=DataParallelStore,
                           rank=process.rank, world=process.world), configs
    shares = split(configs, process.world)
    owned = [[(cfg.source_hook, cfg.target_hook) for cfg in share] for share in shares]
    store = build_store(bridge, configs, buffer_device=process.device, store_type=LayerParallelStore, owned=owned,
                        rank=process.rank, world=process.world)
    return store, shares[process.rank]


def held_by_every_rank(steps: set[int]) -> set[int]:
    """The steps of `steps` that every rank of the process group holds too (each rank passes its own)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(steps))
    return set.intersection(*(set(found) for found in gathered))
