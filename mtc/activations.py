"""The activation store: shuffled (source, target) token activations from a language model.

One forward pass, stopped after the deepest hook needed (`stop_at_layer`, no logits), feeds every hook
pair at once (several layers, cross-layer pairs). Activations of `buffer_tokens` tokens from many
contexts are pooled and shuffled, then served in batches until the buffer is used up; then it refills.
BOS and padding positions are dropped (their activations are outliers).

Resumption is exact: the store's state is three counters (contexts consumed before the current fill,
fill index, batches served from it). Restoring it re-reads the same contexts, recomputes the same
fill, reshuffles it with the same seed and skips the batches already served.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import TranscoderConfig, torch_dtype
from .data import load_documents, pack_contexts, special_token_ids, split_documents
from .language_model import stop_layer, validate_hooks


@dataclass
class ActivationBatch:
    """One batch of token activations; `sources[i]`/`targets[i]` belong to hook pair `i`."""

    sources: list[Tensor]  # [batch, d_in_i]
    targets: list[Tensor]  # [batch, d_out_i]
    context_ids: Tensor  # [batch] index of the context in the token stream
    positions: Tensor  # [batch] position within that context


@dataclass
class Fill:
    """One buffer fill: activations of every hook for the kept tokens, where they came from, and the
    shuffled serving order."""

    acts: dict[str, Tensor]  # hook -> [tokens, d]
    context_ids: Tensor  # [tokens]
    positions: Tensor  # [tokens]
    order: Tensor  # [tokens] permutation
    n_contexts: int
    n_batches: int


class ActivationStore:
    """Serves `ActivationBatch`es for `hook_pairs` from contexts produced by `make_contexts()`.

    `make_contexts` returns a fresh iterator over `[seq_len]` token tensors, always in the same order
    (the store re-creates it to resume). `exclude_token_ids` are never served (BOS, padding).
    `total_batches`, when known, sizes the last fill to what the run still needs. `prefetch` computes
    the next fill on a background thread while the current one is served (two buffers in memory).
    """

    def __init__(
        self,
        bridge,
        make_contexts: Callable[[], Iterable[Tensor]],
        hook_pairs: list[tuple[str, str]],
        *,
        batch_size: int,
        buffer_tokens: int,
        model_batch_size: int,
        exclude_token_ids: Iterable[int],
        buffer_device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        total_batches: int | None = None,
        prefetch: bool = False,
    ):
        self.bridge = bridge
        self.hook_pairs = [tuple(pair) for pair in hook_pairs]
        self.hooks = list(dict.fromkeys(h for pair in self.hook_pairs for h in pair))
        validate_hooks(bridge, self.hooks)
        self.stop_at_layer = stop_layer(self.hooks)
        self.make_contexts = make_contexts
        self.batch_size = batch_size
        self.buffer_tokens = max(buffer_tokens, batch_size)
        self.model_batch_size = model_batch_size
        self.exclude_token_ids = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
        self.buffer_device = torch.device(buffer_device)
        self.dtype = dtype
        self.seed = seed
        self.total_batches = total_batches
        # position in the stream (the whole state)
        self.contexts_before_fill = 0
        self.batches_before_fill = 0
        self.fill_index = -1
        self.batches_served = 0
        # working data, rebuilt from the state
        self._contexts: Iterator[tuple[int, Tensor]] | None = None
        self._fill: Fill | None = None
        self._pending: Future | None = None
        self._producer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtc-store") if prefetch else None
        self.progress: Callable[[int], None] | None = None  # told the tokens each forward pass adds (a progress bar)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        return {"contexts_before_fill": self.contexts_before_fill, "batches_before_fill": self.batches_before_fill,
                "fill_index": self.fill_index, "batches_served": self.batches_served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"activation-store state was saved with seed {state['seed']}, this store has "
                             f"seed {self.seed}; resume with the run's own config")
        self._drop_pending()
        self.contexts_before_fill = state["contexts_before_fill"]
        self.batches_before_fill = state.get("batches_before_fill", 0)
        self.fill_index = state["fill_index"]
        self.batches_served = state["batches_served"]
        self._contexts, self._fill = None, None
        if self.fill_index >= 0:
            self._open_stream(skip=self.contexts_before_fill)
            self._fill = self._compute_fill(self.fill_index, self.batches_before_fill)
            self._prefetch_next()

    # ------------------------------------------------------------------ serving
    def __iter__(self) -> Iterator[ActivationBatch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> ActivationBatch:
        if self._fill is None or self.batches_served >= self._fill.n_batches:
            self._next_fill()
        fill = self._fill
        rows = fill.order[self.batches_served * self.batch_size:(self.batches_served + 1) * self.batch_size]
        self.batches_served += 1
        rows, held = self.held_rows(fill, rows)
        take = {hook: acts[held] for hook, acts in fill.acts.items()}
        return ActivationBatch(sources=[take[s] for s, _ in self.hook_pairs],
                               targets=[take[t] for _, t in self.hook_pairs],
                               context_ids=fill.context_ids[rows], positions=fill.positions[rows])

    def held_rows(self, fill: Fill, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(the batch's rows this store serves, their indices into `fill.acts`): all of them here."""
        return rows, rows

    # ------------------------------------------------------------------ filling
    def _open_stream(self, skip: int) -> None:
        numbered = enumerate(self.make_contexts())
        self._contexts = itertools.islice(numbered, skip, None)

    def _next_fill(self) -> None:
        if self._contexts is None:
            self._open_stream(skip=self.contexts_before_fill)
        if self._fill is not None:
            self.contexts_before_fill += self._fill.n_contexts
            self.batches_before_fill += self._fill.n_batches
        self.fill_index += 1
        self.batches_served = 0
        if self._pending is not None:
            self._fill, self._pending = self._pending.result(), None
        else:
            self._fill = None  # free the previous fill before computing the next one
            self._fill = self._compute_fill(self.fill_index, self.batches_before_fill)
        self._prefetch_next()

    def _prefetch_next(self) -> None:
        """Start computing the fill after the current one, unless the run needs no more batches."""
        after = self.batches_before_fill + self._fill.n_batches
        if self._producer is None or (self.total_batches is not None and after >= self.total_batches):
            return
        self._pending = self._producer.submit(self._compute_fill, self.fill_index + 1, after)

    def _drop_pending(self) -> None:
        """Forget a fill being computed in the background (waiting for it if it already started: it
        reads the context stream)."""
        if self._pending is not None:
            if not self._pending.cancel():
                self._pending.exception()
            self._pending = None

    def _compute_fill(self, fill_index: int, batches_before: int) -> Fill:
        """Run the model over enough contexts for one buffer (or for the batches the run still needs, if
        fewer) and shuffle the result. Deterministic in (stream position, fill_index, batches_before)."""
        wanted = self.buffer_tokens
        if self.total_batches is not None:
            wanted = min(wanted, max(1, self.total_batches - batches_before) * self.batch_size)
        ids, contexts, tokens_held = [], [], 0
        for context_id, tokens in self._contexts:
            ids.append(context_id)
            contexts.append(tokens)
            tokens_held += len(tokens) - 1
            if tokens_held >= wanted:
                break
        if not contexts:
            raise RuntimeError("the token stream is exhausted: the dataset holds fewer tokens than the run "
                               "needs; lower total_tokens or use a larger dataset")
        tokens = torch.stack(contexts)
        keep = ~torch.isin(tokens, self.exclude_token_ids)
        n = int(keep.sum())
        acts = self.activations(tokens, keep)
        for hook, values in acts.items():
            if not torch.isfinite(values).all():
                raise RuntimeError(f"activations at {hook} do not fit activation_dtype={self.dtype} (non-finite "
                                   f"values after the cast); set activation_dtype='float32'")
        if n < self.batch_size:
            raise RuntimeError(f"one buffer fill gave {n} tokens, fewer than batch_size={self.batch_size}; "
                               "the dataset is too small for this batch size")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + fill_index)
        return Fill(acts=acts,
                    context_ids=torch.tensor(ids).unsqueeze(1).expand_as(tokens)[keep].to(self.buffer_device),
                    positions=torch.arange(tokens.shape[1]).expand_as(tokens)[keep].to(self.buffer_device),
                    order=torch.randperm(n, generator=generator).to(self.buffer_device),
                    n_contexts=len(contexts), n_batches=n // self.batch_size)

    def activations(self, tokens: Tensor, keep: Tensor) -> dict[str, Tensor]:
        """`{hook: [kept tokens, d]}` for contexts `tokens` (`[contexts, seq]`), in context order, from
        forward passes of `model_batch_size` contexts."""
        # One preallocated tensor per hook: a fill never holds more than one buffer's worth of activations.
        acts: dict[str, Tensor] = {}
        n, row = int(keep.sum()), 0
        for start in range(0, len(tokens), self.model_batch_size):
            chunk_keep = keep[start:start + self.model_batch_size]
            n_kept = int(chunk_keep.sum())
            for hook, out in self.run_model(tokens[start:start + self.model_batch_size]).items():
                if hook not in acts:
                    acts[hook] = torch.empty(n, out.shape[-1], dtype=self.dtype, device=self.buffer_device)
                acts[hook][row:row + n_kept] = out[chunk_keep.to(out.device)].to(self.buffer_device, self.dtype)
            row += n_kept
            if self.progress is not None:
                self.progress(n_kept)
        return acts

    @torch.no_grad()  # not inference_mode: served tensors must be usable in autograd
    def run_model(self, tokens: Tensor) -> dict[str, Tensor]:
        """Activations `[contexts, seq, d]` of every hook, from one pass stopped after the deepest hook.

        A float16 model (GPUs without native bfloat16, such as the T4) can overflow; then the model is
        switched to float32 for the rest of the run and the pass is repeated."""
        tokens = tokens.to(self.bridge.cfg.device)
        acts: dict[str, Tensor] = {}

        def keeper(name: str):  # keyed by the name asked for: aliases report another hook.name
            def keep(activation: Tensor, hook) -> Tensor:
                acts[name] = activation
                return activation
            return keep

        hooks = [(name, keeper(name)) for name in self.hooks]
        if self.stop_at_layer >= self.bridge.cfg.n_layers:  # stop_at_layer stops before a block, not before logits
            hooks.append((UNEMBED_INPUT, _stop_forward))
        # plain hooks rather than run_with_cache: measured 2-3% faster, as fast as a bare forward
        try:
            self.bridge.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=self.stop_at_layer)
        except _ForwardDone:
            pass
        if next(self.bridge.parameters()).dtype == torch.float16 and not all(
                torch.isfinite(a).all() for a in acts.values()):
            warnings.warn("the language model overflowed in float16; switching it to float32 for the rest of "
                          "the run (slower; set model_dtype='float32' to start that way)", stacklevel=2)
            self.bridge.to(torch.float32)
            return self.run_model(tokens)
        return acts


UNEMBED_INPUT = "unembed.hook_in"


class _ForwardDone(Exception):
    """Raised by a hook to end a forward pass once every activation it needs is kept."""


def _stop_forward(activation: Tensor, hook) -> Tensor:
    raise _ForwardDone


def build_store(bridge, configs: list[TranscoderConfig], buffer_device: str | torch.device = "cpu",
                store_type: type[ActivationStore] = ActivationStore, **store_args) -> ActivationStore:
    """The store that feeds every transcoder in `configs` from one pass of `bridge` (they must agree
    on model, data, batch and buffer settings); it stops computing activations at the run's last batch.
    `store_type` and `store_args` build a subclass (e.g. `mtc.parallel.LayerParallelStore`)."""
    first = configs[0]
    shared = TranscoderConfig.store_fields()
    for cfg in configs[1:]:
        for name in shared:
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(f"transcoders trained from one store must share {name}: "
                                 f"{getattr(first, name)!r} vs {getattr(cfg, name)!r}")
    tokenizer = bridge.tokenizer
    bos, _ = special_token_ids(tokenizer)
    excluded = {bos} | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set())

    def make_contexts():
        documents = load_documents(first.dataset, first.dataset_split, first.text_column)
        return pack_contexts(split_documents(documents, "train"), tokenizer, first.seq_len)

    load_documents(first.dataset, first.dataset_split, first.text_column)  # bad paths fail here, not mid-run

    return store_type(bridge, make_contexts, [(c.source_hook, c.target_hook) for c in configs], **store_args,
                           batch_size=first.batch_size, buffer_tokens=first.buffer_tokens,
                           model_batch_size=first.model_batch_size, exclude_token_ids=excluded,
                           buffer_device=buffer_device, dtype=torch_dtype(first.activation_dtype), seed=first.seed,
                           total_batches=first.total_steps, prefetch=first.prefetch)
