"""Activation samples: per latent, its top-activating contexts, a few random activating ones, its frequency.

`SampleCollector` streams over `[tokens, d_sae]` latent activations on the device: per latent it keeps
the `top_n` largest activations and `n_random` uniformly drawn activating entries (each active entry gets
a uniform random key, the largest keys are kept), as tensors merged with `topk`. Only context ids and
positions are kept; token windows are filled at save time from the token stream.

A saved samples folder holds `index.json` (sizes, window, meta) and one `samples.safetensors`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .checkpoint import atomic_save_tensors, atomic_write_bytes

INDEX_FILE = "index.json"
ARRAYS_FILE = "samples.safetensors"
ContextTokens = Callable[[Tensor], Tensor]


def _merge(kept: Tensor, new: Tensor, n: int, *companions: tuple[Tensor, Tensor]) -> list[Tensor]:
    """The `n` largest of kept `[d, n]` and new `[d, k]` scores per row, and each (kept, new) companion
    array reordered the same way."""
    scores, order = torch.cat([kept, new], dim=1).topk(n, dim=1)
    return [scores] + [torch.cat([k, c], dim=1).gather(1, order) for k, c in companions]


class SampleCollector:
    """Streaming top-N / random / frequency statistics of `d_sae` latents. Empty slots have value 0
    (random: key -1) and context id and position -1."""

    def __init__(self, d_sae: int, top_n: int = 16, n_random: int = 4, device: torch.device | str = "cpu",
                 seed: int = 0):
        self.d_sae, self.top_n, self.n_random = d_sae, top_n, n_random
        self.device = torch.device(device)
        self.tokens_seen = 0
        # used when `update` gets no generator; saved in state_dict so a resumed run draws the same keys
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        empty = lambda n, fill, dtype: torch.full((d_sae, n), fill, dtype=dtype, device=self.device)  # noqa: E731
        self.top_values = empty(top_n, 0.0, torch.float32)
        self.top_context_ids, self.top_positions = empty(top_n, -1, torch.long), empty(top_n, -1, torch.long)
        self.random_keys = empty(n_random, -1.0, torch.float32)
        self.random_values = empty(n_random, 0.0, torch.float32)
        self.random_context_ids, self.random_positions = empty(n_random, -1, torch.long), empty(n_random, -1, torch.long)
        self.frequency_counts = torch.zeros(d_sae, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, latents: Tensor, context_ids: Tensor, positions: Tensor,
               generator: torch.Generator | None = None) -> None:
        """Fold in one batch: `latents [tokens, d_sae]` located by `context_ids`/`positions [tokens]`."""
        if latents.ndim != 2 or latents.shape[1] != self.d_sae:
            raise ValueError(f"latents must have shape [tokens, {self.d_sae}], got {list(latents.shape)}")
        if not (len(context_ids) == len(positions) == latents.shape[0]):
            raise ValueError(f"context_ids ({len(context_ids)}) and positions ({len(positions)}) must have one "
                             f"entry per token ({latents.shape[0]})")
        n_tokens = latents.shape[0]
        if n_tokens == 0:
            return
        acts = latents.detach().to(self.device, torch.float32).T  # [d_sae, tokens]
        ids = context_ids.to(self.device, torch.long).expand(self.d_sae, -1)
        pos = positions.to(self.device, torch.long).expand(self.d_sae, -1)
        active = acts > 0
        self.frequency_counts += active.sum(1)
        self.tokens_seen += n_tokens

        values, rows = acts.topk(min(self.top_n, n_tokens), dim=1)
        self.top_values, self.top_context_ids, self.top_positions = _merge(
            self.top_values, values, self.top_n,
            (self.top_context_ids, ids.gather(1, rows)), (self.top_positions, pos.gather(1, rows)))
        empty = self.top_values <= 0  # inactive candidates tied with empty slots
        self.top_context_ids.masked_fill_(empty, -1)
        self.top_positions.masked_fill_(empty, -1)

        if self.n_random:
            keys = torch.rand(acts.shape, generator=generator or self.generator, device=self.device)
            keys, rows = torch.where(active, keys, -1.0).topk(min(self.n_random, n_tokens), dim=1)
            self.random_keys, self.random_values, self.random_context_ids, self.random_positions = _merge(
                self.random_keys, keys, self.n_random, (self.random_values, acts.gather(1, rows)),
                (self.random_context_ids, ids.gather(1, rows)), (self.random_positions, pos.gather(1, rows)))
            empty = self.random_keys < 0
            self.random_values.masked_fill_(empty, 0.0)
            self.random_context_ids.masked_fill_(empty, -1)
            self.random_positions.masked_fill_(empty, -1)

    # ------------------------------------------------------------------ state
    _TENSORS = ("top_values", "top_context_ids", "top_positions", "random_keys", "random_values",
                "random_context_ids", "random_positions", "frequency_counts")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).clone() for name in self._TENSORS}
        state.update(d_sae=self.d_sae, top_n=self.top_n, n_random=self.n_random, tokens_seen=self.tokens_seen,
                     generator=self.generator.get_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = (state["d_sae"], state["top_n"], state["n_random"])
        if sizes != (self.d_sae, self.top_n, self.n_random):
            raise ValueError(f"sample-collector state has (d_sae, top_n, n_random) = {sizes}, this collector "
                             f"has {(self.d_sae, self.top_n, self.n_random)}")
        for name in self._TENSORS:
            setattr(self, name, state[name].to(self.device).clone())
        self.tokens_seen = int(state["tokens_seen"])
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | Path, context_tokens: ContextTokens, window: tuple[int, int] = (10, 4),
             meta: dict | None = None) -> Path:
        """Write `index.json` and `samples.safetensors` into `folder`; `context_tokens(ids [n])` must return
        the `[n, seq_len]` token rows of those contexts. Windows hold `before` tokens, the peak and
        `after` tokens, padded with -1 past the context's edges."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        before, after = window
        ids = torch.cat([self.top_context_ids.flatten(), self.random_context_ids.flatten()]).cpu()
        wanted = ids[ids >= 0].unique()
        rows = torch.as_tensor(context_tokens(wanted)) if len(wanted) else torch.zeros(0, 1, dtype=torch.long)
        if len(rows) != len(wanted):
            raise ValueError(f"context_tokens returned {len(rows)} rows for {len(wanted)} context ids")
        arrays = {"frequency_counts": self.frequency_counts.cpu()}
        for kind in ("top", "random"):
            ctx, pos = getattr(self, f"{kind}_context_ids").cpu(), getattr(self, f"{kind}_positions").cpu()
            arrays[f"{kind}_values"] = getattr(self, f"{kind}_values").cpu()
            arrays[f"{kind}_context_ids"], arrays[f"{kind}_positions"] = ctx, pos
            arrays[f"{kind}_tokens"] = _windows(rows, wanted, ctx, pos, before, after)
        index = dict(format="mtc-samples", version=1, d_sae=self.d_sae, top_n=self.top_n, n_random=self.n_random,
                     window=[before, after], tokens_seen=self.tokens_seen, arrays=ARRAYS_FILE, meta=meta or {})
        atomic_save_tensors(arrays, folder / ARRAYS_FILE, metadata={"format": "mtc-samples"})
        # last: a folder with an index is complete
        atomic_write_bytes(folder / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())
        return folder


def _windows(rows: Tensor, row_ids: Tensor, ctx: Tensor, pos: Tensor, before: int, after: int) -> Tensor:
    """`[..., before + 1 + after]` int32 tokens around `rows[ctx][pos]`; -1 off the context or for empty slots."""
    seq_len = rows.shape[1]
    at = pos.unsqueeze(-1) + torch.arange(-before, after + 1)
    if not len(row_ids):
        return torch.full(at.shape, -1, dtype=torch.int32)
    row = torch.searchsorted(row_ids, ctx.clamp_min(0)).clamp_max(len(row_ids) - 1)
    valid = (ctx >= 0).unsqueeze(-1) & (at >= 0) & (at < seq_len)
    tokens = rows[row.unsqueeze(-1).expand_as(at), at.clamp(0, seq_len - 1)]
    return torch.where(valid, tokens, -1).to(torch.int32)


# ---------------------------------------------------------------------- reading
@dataclass
class Samples:
    """A loaded samples folder. Arrays are `[d_sae, top_n]` (`top_*`) or `[d_sae, n_random]` (`random_*`);
    `*_tokens` add the window axis."""

    d_sae: int
    top_n: int
    n_random: int
    window: tuple[int, int]
    tokens_seen: int
    top_values: Tensor
    top_context_ids: Tensor
    top_positions: Tensor
    top_tokens: Tensor
    random_values: Tensor
    random_context_ids: Tensor
    random_positions: Tensor
    random_tokens: Tensor
    frequency_counts: Tensor
    meta: dict = field(default_factory=dict)

    @property
    def frequency(self) -> Tensor:
        """Fraction of tokens on which each latent is active."""
        return self.frequency_counts.double() / max(self.tokens_seen, 1)

    def most_frequent(self, n: int) -> list[int]:
        return self.frequency_counts.argsort(descending=True, stable=True)[:n].tolist()

    def _examples(self, kind: str, i: int) -> list[dict]:
        before = self.window[0]
        out = []
        for value, ctx, pos, tokens in zip(getattr(self, f"{kind}_values")[i].tolist(),
                                           getattr(self, f"{kind}_context_ids")[i].tolist(),
                                           getattr(self, f"{kind}_positions")[i].tolist(),
                                           getattr(self, f"{kind}_tokens")[i]):
            if ctx < 0:
                continue
            valid = tokens >= 0  # padding only at the edges, so dropping it keeps the window contiguous
            out.append(dict(value=value, context_id=ctx, position=pos, tokens=tokens[valid].tolist(),
                            peak=before - int((~valid[:before]).sum())))
        return out

    def latent(self, i: int) -> dict:
        """Latent `i`: frequency, top examples and random examples; each example holds value, context_id,
        position, tokens (window without padding) and peak (the peak's index within tokens)."""
        if not 0 <= i < self.d_sae:
            raise IndexError(f"latent {i} out of range 0..{self.d_sae - 1}")
        return dict(index=i, count=int(self.frequency_counts[i]), frequency=float(self.frequency[i]),
                    top=self._examples("top", i), random=self._examples("random", i))

    def format_latent(self, i: int, tokenizer=None, n: int = 8, n_random: int = 2) -> str:
        """Top contexts one per line with the peak token marked `«like this»`, then random examples.
        Without a tokenizer, token ids are shown."""
        info = self.latent(i)
        lines = [f"latent {i}: frequency {info['frequency']:.4%} ({info['count']} of {self.tokens_seen} tokens)"]
        for title, examples in (("top", info["top"][:n]), ("random", info["random"][:n_random])):
            if examples:
                lines.append(f"  {title}:")
                lines += [f"    {ex['value']:9.4f}  {_marked(ex, tokenizer)}" for ex in examples]
        if not info["top"]:
            lines.append("  (never active)")
        return "\n".join(lines)

    def report(self, tokenizer, latents: list[int], n: int = 8) -> str:
        return "\n\n".join(self.format_latent(i, tokenizer, n=n) for i in latents)

    def group_report(self, tokenizer, prefix_sizes: list[int], per_group: int = 3, most_frequent: int = 10,
                     n: int = 5) -> str:
        """The `most_frequent` most frequent latents, then the first `per_group` latents of each prefix
        group `[0, m1), [m1, m2), ...`."""
        parts = [f"=== the {most_frequent} most frequent latents ===",
                 self.report(tokenizer, self.most_frequent(most_frequent), n=n)]
        for g, (start, end) in enumerate(zip([0, *prefix_sizes[:-1]], prefix_sizes), start=1):
            parts += [f"=== group {g}: latents [{start}, {end}) ===",
                      self.report(tokenizer, list(range(start, min(end, start + per_group, self.d_sae))), n=n)]
        return "\n\n".join(parts)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _marked(example: dict, tokenizer) -> str:
    tokens, peak = example["tokens"], example["peak"]
    decode = tokenizer.decode if tokenizer is not None else (lambda ids: " ".join(f"[{t}]" for t in ids))
    before, at, after = decode(tokens[:peak]), decode(tokens[peak:peak + 1]), decode(tokens[peak + 1:])
    return _one_line(f"{before}«{at}»{after}")


def load_samples(path: str | Path) -> Samples:
    """Read a samples folder, or a run folder holding `samples/`."""
    path = Path(path)
    folder = path if (path / INDEX_FILE).is_file() else path / "samples"
    if not (folder / INDEX_FILE).is_file():
        raise FileNotFoundError(f"no {INDEX_FILE} in {path} or {path / 'samples'}; point to a folder written "
                                f"by SampleCollector.save")
    index = json.loads((folder / INDEX_FILE).read_text())
    return Samples(d_sae=index["d_sae"], top_n=index["top_n"], n_random=index["n_random"],
                   window=tuple(index["window"]), tokens_seen=index["tokens_seen"], meta=index.get("meta", {}),
                   **load_file(str(folder / index.get("arrays", ARRAYS_FILE))))


# ---------------------------------------------------------------------- a pass over a trained model
@torch.no_grad()
def collect_samples(model, store, n_batches: int, pair_index: int = 0, top_n: int = 16, n_random: int = 4,
                    seed: int = 0) -> SampleCollector:
    """Samples of `model`'s JumpReLU latents over `n_batches` batches of `store` (hook pair `pair_index`)."""
    device, dtype = model.W_enc.device, model.W_enc.dtype
    collector = SampleCollector(model.cfg.d_sae, top_n, n_random, device=device, seed=seed)
    for _ in range(n_batches):
        batch = store.next_batch()
        latents = model.encode(batch.sources[pair_index].to(device, dtype))
        collector.update(latents, batch.context_ids, batch.positions)
    return collector


def context_lookup(make_contexts: Callable[[], Iterable[Tensor]]) -> ContextTokens:
    """A `context_tokens` function for `SampleCollector.save`: reads the stream (once, as far as the
    largest id asked for) and keeps every row it reads in memory."""
    rows: dict[int, Tensor] = {}
    stream = enumerate(make_contexts())

    def lookup(ids: Tensor) -> Tensor:
        wanted = [int(i) for i in ids]
        needed = max(wanted, default=-1)
        if needed not in rows:
            for context_id, tokens in stream:
                rows[context_id] = tokens
                if context_id >= needed:
                    break
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise ValueError(f"context ids {missing[:5]} are past the end of the token stream ({len(rows)} contexts)")
        if not wanted:
            return torch.zeros(0, 1, dtype=torch.long)
        return torch.stack([rows[i] for i in wanted])

    return lookup
