"""Data-parallel training under `torchrun`: every rank trains the same transcoder(s) on its share of each batch.

    torchrun --standalone --nproc-per-node 8 -m mtc train --preset gemma2-2b-l17

In every buffer fill all ranks read the same contexts and shuffle the fill's rows with the same seed, but
each runs the language model only on its contiguous share of the contexts (`DataParallelStore`). Batch
`b` is the same `batch_size` rows as in one process; each rank holds the rows it computed, about
`batch_size / world` of them. The transcoder step then works on the whole batch through
`ProcessGroupReduction`: BatchTopK keeps the `k * batch_size` largest pre-activations of the **whole**
batch (not of each rank's share: per-rank selection would change what the loss is, and the result with
the number of ranks), the FVUs and AuxK are normalised by the whole batch's variance, L0, the firing
counters and the threshold estimate come from the whole batch, and each rank's gradient is its part of
the whole batch's gradient; they are summed before clipping, so every rank takes the same Adam step and
the weights stay identical. The run equals the single-process run up to floating-point summation order.

Rank 0 alone writes config.json, metrics, W&B, checkpoints, samples (of its own rows), `final/` and the
mirror; every rank reads the checkpoints to resume, so the run dir must be on a filesystem they all see.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .activations import ActivationStore
from .distributed import context_shares


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
