"""Layer-parallel training of a transcoder set under `torchrun`: each process (rank) owns some of a pass's
layers and trains them; the language model's work is shared.

    torchrun --nproc-per-node 2 -m mtc train --layers all ...

In every buffer fill each rank reads the same contexts, runs the language model on its contiguous share
of them (whole forward batches of `model_batch_size` contexts) for every hook of the pass, and an
all-to-all sends each hook's rows to the rank that owns the hook. Received rows are put back in context
order, so each rank holds exactly the fill a single process would hold for its layers: same rows, same
shuffle, same batches, and each layer trains exactly as it would alone (bit for bit when the forward
batches are the same, which they are). A pass of N ranks holds N times the layers of one device.

Each rank writes its own layers' run dirs; rank 0 writes `set.json`. Every rank resumes from the newest
checkpoint step that every rank holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .activations import ActivationStore
from .checkpoint import checkpoint_step, list_checkpoints
from .distributed import context_shares

def agree_on_checkpoints(run_dirs: list[Path], mirror_dirs: list[Path | None]) -> None:
    """Before resuming, set aside (as `checkpoints/.unmatched-step_<N>`) every checkpoint newer than the newest
    step that all ranks hold for all their layers: a rank killed while writing leaves that step incomplete
    for the set, and all ranks must continue from the same step."""
    def steps(folder: Path | None) -> set[int]:
        return {checkpoint_step(p) for p in list_checkpoints(folder)} if folder is not None and folder.is_dir() else set()

    held = [steps(run_dir) | steps(mirror) for run_dir, mirror in zip(run_dirs, mirror_dirs)]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(set.intersection(*held)) if held else [])
    newest = max(set.intersection(*(set(found) for found in gathered)), default=-1)
    for folder in [*run_dirs, *mirror_dirs]:
        for path in (list_checkpoints(folder) if folder is not None and folder.is_dir() else []):
            if checkpoint_step(path) > newest:
                print(f"note: {path} is set aside as .unmatched-{path.name}: another rank has no checkpoint of "
                      f"that step", file=sys.stderr)
                path.rename(path.with_name(f".unmatched-{path.name}"))


class LayerParallelStore(ActivationStore):
    """An `ActivationStore` for one rank: computes every hook of `all_pairs` on its share of each fill's
    contexts, exchanges rows with the other ranks, and serves only `owned[rank]`'s pairs."""

    def __init__(self, bridge, make_contexts, all_pairs: list[tuple[str, str]], owned: list[list[tuple[str, str]]],
                 **kwargs):
        super().__init__(bridge, make_contexts, all_pairs, **kwargs)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
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
