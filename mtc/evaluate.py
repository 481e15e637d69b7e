"""Evaluation on held-out tokens: reconstruction and splice scores, for every prefix.

For each prefix g (and so for the full model, the last prefix), on held-out contexts:

- `fvu`, `l0`, `dead_pct` (latents that never fired on these tokens), `dense_pct` (latents firing on
  more than `DENSE_FREQUENCY` of them), computed on the target hook;
- splice scores: the language model's next-token cross-entropy when the target hook's value is
  replaced by the transcoder's prediction from the source hook of the *same* forward pass
  (`ce_spliced`), against the clean run (`ce_clean`) and the run with the target zero-ablated
  (`ce_zero_ablation`): `ce_loss_score = (ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean)`,
  and `kl_div`, the mean per-token KL(clean || spliced).

BOS positions are excluded from every token average and are never replaced in spliced runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import load_documents, pack_contexts, special_token_ids, split_documents
from .hierarchy import CoFiring
from .language_model import validate_hooks
from .transcoder import MatryoshkaTranscoder

DENSE_FREQUENCY = 0.1
HELD_OUT_SPREAD = 4  # held-out contexts are chosen evenly from this many times as many


def held_out_contexts(bridge, dataset: str, n_tokens: int, seq_len: int, split: str = "train",
                      text_column: str = "text", spread: int = HELD_OUT_SPREAD) -> Tensor:
    """`[n, seq_len]` contexts packed from the held-out documents only (never seen in training).

    They are taken evenly from the first `spread * n` held-out contexts (or all there are), not the first
    `n`: in a corpus of long documents the first few thousand tokens are a handful of documents, and a
    sample that narrow calls every latent of other topics dead (18.6% against 11.0% spread, on the demo)."""
    documents = split_documents(load_documents(dataset, split, text_column), "eval")
    n_contexts = max(1, -(-n_tokens // (seq_len - 1)))
    contexts = list(itertools.islice(pack_contexts(documents, bridge.tokenizer, seq_len), spread * n_contexts))
    if not contexts:
        raise RuntimeError(f"dataset {dataset} has no held-out documents to evaluate on; use a larger dataset")
    chosen = torch.linspace(0, len(contexts) - 1, min(n_contexts, len(contexts))).round().long()
    return torch.stack([contexts[i] for i in chosen.tolist()])


def next_token_log_probs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


class PrefixStatistics:
    """Held-out reconstruction statistics of every prefix, summed over batches of (source, target) rows.

    `add` encodes a batch once with the full model (a prefix's JumpReLU latents are the first `m` columns
    of the full model's latents), decodes each prefix (skip path included) and adds up, per prefix, the
    residual sum of squares; per latent, how often it fired; and the parts of the target's pooled variance
    around its mean over all rows. `evaluate` (hooks of a live model) and `quality.evaluate_cached` (stored
    activations) both report from it."""

    def __init__(self, prefix_sizes: list[int]):
        self.prefix_sizes = list(prefix_sizes)
        self.residual_sq = torch.zeros(len(self.prefix_sizes), dtype=torch.float64)
        self.fired = torch.zeros(self.prefix_sizes[-1], dtype=torch.long)  # per latent, over all rows
        self.y_sum: Tensor | float = 0.0  # [d_out] sum of the target, float64
        self.y_sq: Tensor | float = 0.0  # sum of its squares
        self.tokens = 0

    @torch.no_grad()
    def add(self, model: MatryoshkaTranscoder, x: Tensor, y: Tensor) -> Tensor:
        """Add one batch: `x [n, d_in]` and `y [n, d_out]` in the model's dtype and device. Returns its latents."""
        latents = model.encode(x)
        skip = x @ model.W_skip if model.W_skip is not None else None
        for g in range(len(self.prefix_sizes)):
            y_hat = model.decode(latents, prefix=g + 1)  # reads the prefix's first m latents
            if skip is not None:
                y_hat = y_hat + skip
            self.residual_sq[g] += float((y - y_hat).double().pow(2).sum())
        self.fired += (latents > 0).sum(0).cpu()
        self.y_sum = self.y_sum + y.double().sum(0)
        self.y_sq = self.y_sq + y.double().pow(2).sum()
        self.tokens += len(y)
        return latents

    @property
    def total_variance(self) -> float:
        """Sum of squares of the target around its mean over all rows added (pooled over batches)."""
        return float(self.y_sq - self.y_sum.pow(2).sum() / self.tokens)

    def rows(self, dense: bool = True) -> list[dict]:
        """One row per prefix: `fvu`, `l0`, `dead_pct` (never fired on these rows) and, with `dense`,
        `dense_pct` (fired on more than `DENSE_FREQUENCY` of them)."""
        total_variance, rows = self.total_variance, []
        for g, m in enumerate(self.prefix_sizes):
            frequency = self.fired[:m].double() / self.tokens
            row = {"prefix": g + 1, "latents": m, "fvu": float(self.residual_sq[g]) / total_variance,
                   "l0": float(self.fired[:m].sum()) / self.tokens,
                   "dead_pct": 100.0 * float((frequency == 0).double().mean())}
            if dense:
                row["dense_pct"] = 100.0 * float((frequency > DENSE_FREQUENCY).double().mean())
            rows.append(row)
        return rows


class _Totals:
    """Token-weighted running sums of per-token losses."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, name: str, per_token: Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(per_token.double().sum())

    def mean(self, name: str) -> float:
        return self.sums[name] / self.count


@torch.no_grad()
def evaluate(model: MatryoshkaTranscoder, bridge, contexts: Tensor, batch_size: int = 4,
             progress: Callable[[int], None] | None = None, cofiring: CoFiring | None = None) -> dict:
    """Evaluate `model` (source -> target hooks from its config) on `contexts`; returns the eval report.
    With `cofiring`, the held-out latents are also added to it (for `hierarchy_report`)."""
    cfg = model.cfg
    source, target = cfg.source_hook, cfg.target_hook
    validate_hooks(bridge, [source, target])
    bos, _ = special_token_ids(bridge.tokenizer)
    model.eval()
    G = cfg.n_prefixes
    totals = _Totals()
    statistics = PrefixStatistics(cfg.prefix_sizes)
    device = bridge.cfg.device
    for start in range(0, len(contexts), batch_size):
        tokens = contexts[start:start + batch_size].to(device)
        keep = (tokens != bos)
        predict = keep[:, 1:]  # positions whose next token is predicted, excluding BOS targets
        targets = tokens[:, 1:]

        clean_logits, cache = bridge.run_with_cache(tokens, names_filter=[source, target])
        clean_lp = next_token_log_probs(clean_logits)
        del clean_logits
        n_predicted = int(predict.sum())
        totals.count += n_predicted
        totals.add("ce_clean", -clean_lp.gather(-1, targets[..., None])[..., 0][predict])

        x = cache[source][keep].to(model.W_enc.dtype)
        y = cache[target][keep].to(model.W_enc.dtype)
        latents = statistics.add(model, x, y)
        if cofiring is not None:
            cofiring.update(latents)

        hooked: dict[str, Tensor] = {}  # the source activation of the pass in progress

        def replace(value: Tensor, hook, prefix: int | None) -> Tensor:
            """The transcoder's prediction (or zeros) at every position but BOS, which the transcoder
            never trained on and which Gemma uses as an attention sink."""
            if prefix is None:
                new = torch.zeros_like(value)
            else:
                new = model(hooked[source].to(model.W_enc.dtype), prefix=prefix).to(value.dtype)
            return torch.where(keep[..., None], new, value)

        def keep_source(value: Tensor, hook) -> Tensor:
            hooked[source] = value
            return value

        runs = [("zero_ablation", None)] + [(f"prefix_{g}", g) for g in range(1, G + 1)]
        for name, prefix in runs:
            logits = bridge.run_with_hooks(tokens, fwd_hooks=[
                (source, keep_source), (target, lambda value, hook, p=prefix: replace(value, hook, p))])
            log_probs = next_token_log_probs(logits)
            del logits
            totals.add(f"ce_{name}", -log_probs.gather(-1, targets[..., None])[..., 0][predict])
            kl = (clean_lp.exp() * (clean_lp - log_probs)).sum(-1)
            totals.add(f"kl_{name}", kl[predict])
        if progress is not None:
            progress(len(tokens))

    ce_clean, ce_zero = totals.mean("ce_clean"), totals.mean("ce_zero_ablation")
    rows = statistics.rows()
    for row in rows:
        ce_spliced = totals.mean(f"ce_prefix_{row['prefix']}")
        row.update(ce_spliced=ce_spliced, ce_loss_score=(ce_zero - ce_spliced) / (ce_zero - ce_clean),
                   kl_div=totals.mean(f"kl_prefix_{row['prefix']}"))
    return {"tokens": statistics.tokens, "predicted_tokens": totals.count, "ce_clean": ce_clean,
            "ce_zero_ablation": ce_zero, "kl_zero_ablation": totals.mean("kl_zero_ablation"),
            "full": rows[-1], "prefixes": rows, "model": cfg.model_name, "source_hook": source,
            "target_hook": target, "k": cfg.k, "l0_over_k": rows[-1]["l0"] / cfg.k}


def format_table(reports: dict[str, dict]) -> str:
    """Side-by-side text table: one block of rows (one per prefix) for each named report."""
    header = f"{'model':<22}{'prefix':>7}{'latents':>9}{'fvu':>9}{'l0':>8}{'dead%':>7}{'dense%':>8}" \
             f"{'ce_spliced':>12}{'ce_score':>10}{'kl_div':>9}"
    lines = [header, "-" * len(header)]
    for name, report in reports.items():
        for row in report["prefixes"]:
            label = "full" if row is report["prefixes"][-1] else str(row["prefix"])
            lines.append(f"{name[:21]:<22}{label:>7}{row['latents']:>9}{row['fvu']:>9.4f}{row['l0']:>8.1f}"
                         f"{row['dead_pct']:>7.1f}{row['dense_pct']:>8.1f}{row['ce_spliced']:>12.4f}"
                         f"{row['ce_loss_score']:>10.4f}{row['kl_div']:>9.4f}")
    first = next(iter(reports.values()))
    lines.append(f"clean CE {first['ce_clean']:.4f}, zero-ablation CE {first['ce_zero_ablation']:.4f}, "
                 f"{first['tokens']} held-out tokens")
    for name, report in reports.items():
        if "k" in report:  # JumpReLU sparsity against the BatchTopK k it was trained at
            lines.append(f"{name}: full-model L0 {report['full']['l0']:.1f} for k={report['k']} "
                         f"({100 * (report['l0_over_k'] - 1):+.1f}%)")
    for name, report in reports.items():
        if "hierarchy" in report:
            h = report["hierarchy"]
            shares = ", ".join(f"group {g['group']} {g['hierarchy_share']:.2f}" for g in h["groups"])
            kind = "frequency pseudo-groups" if h["pseudo_groups"] else "prefix groups"
            lines.append(f"{name}: share of latents whose best earlier parent fires with them >= {h['threshold']} "
                         f"of the time ({kind}): {h['hierarchy_share']:.2f} ({shares})")
        if "absorption" in report:
            a = report["absorption"]
            lines.append(f"{name}: first-letter absorption {a['mean_absorption_fraction']:.3f}, full absorption "
                         f"{a['mean_full_absorption']:.3f}, main latents per letter {a['mean_split_latents']:.2f} "
                         f"({a['letters_passing']} letters with probe F1 > {a['min_f1']}"
                         + ("" if a["enough_letters"] else f", fewer than the {a['min_letters']} required") + ")")
    return "\n".join(lines)


def plot_matryoshka_curve(reports: dict[str, dict], path: Path) -> Path:
    """FVU and CE loss score against prefix size (the Matryoshka curve), one line per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fvu, ax_ce) = plt.subplots(1, 2, figsize=(10, 4))
    for name, report in reports.items():
        sizes = [row["latents"] for row in report["prefixes"]]
        ax_fvu.plot(sizes, [row["fvu"] for row in report["prefixes"]], marker="o", label=name)
        ax_ce.plot(sizes, [row["ce_loss_score"] for row in report["prefixes"]], marker="o", label=name)
    sizes = sorted({row["latents"] for report in reports.values() for row in report["prefixes"]})
    for ax, title in ((ax_fvu, "FVU (lower is better)"), (ax_ce, "CE loss score (higher is better)")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(m) for m in sizes])
        ax.minorticks_off()
        ax.set_xlabel("latents in prefix")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
