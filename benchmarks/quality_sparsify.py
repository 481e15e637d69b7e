"""Reference quality point: EleutherAI's sparsify (PyPI `eai-sparsify`) training a TopK transcoder
on exactly the activations mtc trains on, read from an mtc activation cache.

The cache is a safetensors file with float32 tensors `train_source [N, d_in]`, `train_target
[N, d_out]` (rows already shuffled, in the order mtc consumes them), `eval_source [M, d_in]` and
`eval_target [M, d_out]`, and optional string metadata `model_name`, `source_hook`, `target_hook`.

Training is sparsify's own `Trainer.fit` (not a re-implementation): a small stand-in model feeds it
the cached rows as one-token "sequences", in file order, `--batch-size` tokens per step, one pass,
and exposes the cached (source, target) pair at a hookpoint, so sparsify's forward hook does the
work exactly as on a language model (first-batch bias initialisation, `SparseCoder.forward` loss
with optional AuxK, optimiser and schedule, dead-latent counters). Everything left unset takes
sparsify's defaults (`SparseCoderConfig`, `TrainConfig`), including the learning rate, which
sparsify scales with the number of latents.

`--normalize mean_norm` gives sparsify the units mtc trains in: the source and the target are each
divided by `mean(||a||) / sqrt(d)` measured on the first training batch (mtc's `mean_norm`, estimated on
the same rows), so both have mean norm sqrt(d). FVU does not depend on the target's units, so the
figures stay comparable with the raw run's; `--normalize none` (the default) trains on raw activations.

Evaluation is on the held-out rows with the weights sparsify saves in its checkpoint (for its
default schedule-free optimiser these are the averaged weights, `optimizer.eval()`):

- `fvu`: sum over tokens and dims of (y - y_hat)^2 / sum of (y - mean(y))^2, the mean taken over all
  held-out tokens and both sums pooled over all of them (mtc's definition);
- `fvu_first_M`: the same with only latents [0, M) kept after TopK (`--first-latents`, default 160),
  for comparison with a Matryoshka first prefix;
- `l0`: mean number of latents with a positive activation per token;
- `dead_pct_eval`: latents that never fire (positive activation) on the held-out tokens;
- `dead_pct_train`: latents sparsify's own counter says have not fired in the last `--dead-window`
  training tokens (sparsify counts a latent as fired whenever TopK selects it).

Run it from its own virtualenv (sparsify pins other versions than mtc; this script does not import
mtc):

    python -m mtc bench --quality                # writes runs/quality/demo-cache.safetensors first
    python -m venv .venv-sparsify
    .venv-sparsify/bin/pip install torch==2.13.0   # on a GPU machine: the torch you have
    .venv-sparsify/bin/pip install eai-sparsify torch==2.13.0
    .venv-sparsify/bin/python benchmarks/quality_sparsify.py --cache runs/quality/demo-cache.safetensors \\
        --json sparsify.json [--normalize mean_norm] [--skip] [--threads 1]

`python -m mtc bench --quality --sparsify-python .venv-sparsify/bin/python` runs it the same way, in mtc's units at
the preset's width, k and batch size, and adds its row to the quality table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import sparsify
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
from torch import Tensor, nn
from torch.utils.data import Dataset

HOOKPOINT = "transcoded"  # name of the stand-in module whose input and output sparsify hooks


class CachedTarget(nn.Module):
    """The transcoded module: called with (source rows, row indices), returns the cached target rows."""

    def __init__(self, target: Tensor):
        super().__init__()
        self.register_buffer("target", target, persistent=False)

    def forward(self, source: Tensor, rows: Tensor) -> Tensor:
        return self.target[rows]


class CachedActivations(nn.Module):
    """Stands in for the language model: `input_ids [batch, 1]` are row numbers of the cache; the
    forward pass sends those rows' source activations through the hooked module, which returns their
    target activations. Provides the few attributes sparsify's Trainer reads from a model."""

    def __init__(self, source: Tensor, target: Tensor):
        super().__init__()
        self.register_buffer("source", source, persistent=False)
        setattr(self, HOOKPOINT, CachedTarget(target))

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def dummy_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: Tensor) -> Tensor:
        return getattr(self, HOOKPOINT)(self.source[input_ids], input_ids)


class RowNumbers(Dataset):
    """Row i of the cache as a one-token sequence; sparsify's DataLoader keeps file order."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": torch.tensor([i])}


def mean_norm_scale(acts: Tensor) -> float:
    """`mean(||a||) / sqrt(d)`, as mtc's `normalize_activations="mean_norm"` computes it."""
    return float(acts.double().norm(dim=-1).mean()) / acts.shape[-1] ** 0.5


def load_cache(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return tensors, metadata


@torch.no_grad()
def evaluate(sae: SparseCoder, x: Tensor, y: Tensor, first: int, chunk: int = 4096) -> dict[str, float]:
    """Held-out FVU (pooled over all tokens), FVU with only latents [0, first), L0 and dead latents."""
    fired = torch.zeros(sae.num_latents, dtype=torch.bool)
    residual_full = residual_first = 0.0
    active_full = active_first = 0
    for start in range(0, len(x), chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        out = sae(xb, yb)
        acts, indices = out.latent_acts, out.latent_indices
        active = acts > 0
        fired[indices[active]] = True
        active_full += int(active.sum())
        residual_full += float((yb - out.sae_out).double().pow(2).sum())

        in_first = indices < first
        y_first = sae.decode(torch.where(in_first, acts, 0.0), indices)
        if sae.W_skip is not None:
            y_first = y_first + xb @ sae.W_skip.mT
        active_first += int((active & in_first).sum())
        residual_first += float((yb - y_first).double().pow(2).sum())

    y64 = y.double()
    total_variance = float((y64 - y64.mean(0)).pow(2).sum())
    return {
        "fvu": residual_full / total_variance,
        f"fvu_first_{first}": residual_first / total_variance,
        "l0": active_full / len(x),
        f"l0_first_{first}": active_first / len(x),
        "dead_pct_eval": 100.0 * float((~fired).double().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="mtc activation cache (.safetensors)")
    parser.add_argument("--d-sae", type=int, default=2560, help="number of latents (sparsify's num_latents)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per training step")
    parser.add_argument("--skip", action="store_true", help="linear skip connection (skip_connection=True)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: sparsify's own, scaled with the number of latents)")
    parser.add_argument("--optimizer", choices=["signum", "adam"], default=None,
                        help="sparsify optimiser (default: sparsify's, signum)")
    parser.add_argument("--auxk-alpha", type=float, default=None, help="AuxK weight (default: sparsify's)")
    parser.add_argument("--dead-feature-threshold", type=int, default=None,
                        help="tokens without firing before AuxK treats a latent as dead (default: sparsify's)")
    parser.add_argument("--normalize", choices=["none", "mean_norm"], default="none",
                        help="mean_norm: divide source and target by mean(||a||)/sqrt(d) of the first batch "
                             "(mtc's units); none: raw activations")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (sparsify's init_seeds)")
    parser.add_argument("--first-latents", type=int, default=160, help="M for fvu_first_M")
    parser.add_argument("--dead-window", type=int, default=100_000,
                        help="dead_pct_train: latents that did not fire in this many last training tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    tensors, metadata = load_cache(args.cache)
    train_x, train_y = tensors["train_source"], tensors["train_target"]
    eval_x, eval_y = tensors["eval_source"], tensors["eval_target"]
    d_in, d_out = train_x.shape[1], train_y.shape[1]
    scales = {"source": 1.0, "target": 1.0}
    if args.normalize == "mean_norm":
        scales = {"source": mean_norm_scale(train_x[:args.batch_size]),
                  "target": mean_norm_scale(train_y[:args.batch_size])}
        train_x, eval_x = train_x / scales["source"], eval_x / scales["source"]
        train_y, eval_y = train_y / scales["target"], eval_y / scales["target"]
    if d_in != d_out:
        raise SystemExit(f"sparsify's SparseCoder needs d_in == d_out (its W_dec and b_dec have the "
                         f"input's width); this cache maps {d_in} -> {d_out}")

    overrides = {name: value for name, value in [("lr", args.lr), ("optimizer", args.optimizer),
                                                 ("auxk_alpha", args.auxk_alpha),
                                                 ("dead_feature_threshold", args.dead_feature_threshold)]
                 if value is not None}
    sae_cfg = SparseCoderConfig(num_latents=args.d_sae, k=args.k, skip_connection=args.skip, transcode=True)
    model = CachedActivations(train_x, train_y)

    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(sae=sae_cfg, batch_size=args.batch_size, hookpoints=[HOOKPOINT],
                          init_seeds=[args.seed], log_to_wandb=False, save_dir=save_dir,
                          save_every=10**12, **overrides)
        trainer = Trainer(cfg, RowNumbers(len(train_x)), model)
        optimizer = trainer.optimizers[0]
        lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])

        train_start = time.perf_counter()
        trainer.fit()
        train_seconds = time.perf_counter() - train_start

    # Evaluate the weights sparsify's checkpoint holds: the schedule-free average for signum
    for opt in trainer.optimizers:
        if isinstance(opt, ScheduleFreeWrapper):
            opt.eval()
    sae = trainer.saes[HOOKPOINT]
    sae.eval()

    eval_start = time.perf_counter()
    metrics = evaluate(sae, eval_x, eval_y, args.first_latents)
    eval_seconds = time.perf_counter() - eval_start

    tokens_since_fired = trainer.num_tokens_since_fired[HOOKPOINT]
    metrics["dead_pct_train"] = 100.0 * float((tokens_since_fired >= args.dead_window).double().mean())

    steps = -(-len(train_x) // args.batch_size)
    settings = {
        "cache": args.cache, "metadata": metadata, "d_in": d_in, "d_out": d_out,
        "d_sae": sae.num_latents, "k": sae_cfg.k, "skip_connection": sae_cfg.skip_connection,
        "batch_size_tokens": args.batch_size, "steps": steps, "train_tokens": len(train_x),
        "eval_tokens": len(eval_x), "optimizer": cfg.optimizer, "lr": lr,
        "lr_warmup_steps": cfg.lr_warmup_steps if cfg.optimizer == "adam" else None,
        "auxk_alpha": cfg.auxk_alpha, "dead_feature_threshold": cfg.dead_feature_threshold,
        "normalize": args.normalize, "scales": scales, "seed": args.seed, "first_latents": args.first_latents,
        "dead_window": args.dead_window,
        "threads": torch.get_num_threads(),
    }
    result = {
        **metrics,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - start,
        "sparsify_version": sparsify.__version__, "torch_version": torch.__version__,
        "settings": settings,
    }

    first = args.first_latents
    print()
    print(f"sparsify {sparsify.__version__} transcoder {d_in} -> {sae.num_latents} latents -> {d_out}, "
          f"k={sae_cfg.k}, skip={sae_cfg.skip_connection}, {cfg.optimizer} lr={lr:.3g}, "
          f"auxk_alpha={cfg.auxk_alpha:g}, activations: {args.normalize}")
    print(f"trained on {len(train_x):,} tokens ({steps} steps of {args.batch_size}) in {train_seconds:.1f} s "
          f"with {torch.get_num_threads()} thread(s); evaluated on {len(eval_x):,} held-out tokens")
    print(f"{'latents':>14}{'fvu':>9}{'l0':>8}")
    print(f"{'all ' + str(sae.num_latents):>14}{metrics['fvu']:>9.4f}{metrics['l0']:>8.1f}")
    print(f"{'first ' + str(first):>14}{metrics[f'fvu_first_{first}']:>9.4f}{metrics[f'l0_first_{first}']:>8.1f}")
    print(f"dead latents: {metrics['dead_pct_eval']:.1f}% on held-out tokens, "
          f"{metrics['dead_pct_train']:.1f}% over the last {args.dead_window:,} training tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
