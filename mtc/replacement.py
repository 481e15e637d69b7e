"""Every MLP replaced at once: how well a transcoder set or a cross-layer transcoder stands in for all the MLPs of a
model together, as in circuit tracing's replacement model.

On held-out contexts, for every prefix g:

- `fvu`: each layer's FVU from the clean run's activations, averaged over layers;
- `ce_replaced`: the next-token cross-entropy when every layer's MLP output is its reconstruction from the source
  activations of the *replaced* run itself (errors compound from layer to layer), against the clean run and the run
  with every MLP output zeroed: `ce_loss_score = (ce_zero_ablation - ce_replaced) / (ce_zero_ablation - ce_clean)`;
  and `kl_div`, the mean per-token KL(clean || replaced).

BOS positions are never replaced and are left out of every average, as in `mtc.evaluate`.
`python -m mtc eval --run DIR` writes this report (`replacement.json`) when DIR is a set or a CLT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .clt import CrossLayerTranscoder
from .data import special_token_ids
from .evaluate import next_token_log_probs
from .transcoder import MatryoshkaTranscoder


class SetReplacement:
    """Layer l's MLP output from layer l's own transcoder (`{layer: transcoder}` of a set)."""

    def __init__(self, models: dict[int, MatryoshkaTranscoder]):
        self.models = models
        self.layers = sorted(models)
        self.n_prefixes = min(model.cfg.n_prefixes for model in models.values())
        self.hooks = [(models[layer].cfg.source_hook, models[layer].cfg.target_hook) for layer in self.layers]

    def reset(self) -> None:
        """A new forward pass begins."""

    def reconstruct(self, position: int, source: Tensor, prefix: int) -> Tensor:
        return self.models[self.layers[position]](source, prefix=prefix)


class CLTReplacement:
    """Layer l's MLP output from the latents of every layer up to l (`CrossLayerTranscoder.decode_layer`)."""

    def __init__(self, model: CrossLayerTranscoder):
        self.model, self.layers, self.n_prefixes = model, model.cfg.clt_layers, model.cfg.n_prefixes
        self.hooks = [(model.cfg.source_hook.format(layer=layer), model.cfg.target_hook.format(layer=layer))
                      for layer in self.layers]
        self.latents: list[Tensor] = []

    def reset(self) -> None:
        self.latents = []

    def reconstruct(self, position: int, source: Tensor, prefix: int) -> Tensor:
        if len(self.latents) != position:
            raise RuntimeError("CLT replacement: layers must be replaced in order within one forward pass")
        self.latents.append(self.model.encode_layer(source, position, prefix))
        return self.model.decode_layer(self.latents, position, prefix)


def replacement_for(models) -> SetReplacement | CLTReplacement:
    return CLTReplacement(models) if isinstance(models, CrossLayerTranscoder) else SetReplacement(models)


@torch.no_grad()
def evaluate_replacement(replacement: SetReplacement | CLTReplacement, bridge, contexts: Tensor,
                         batch_size: int = 4) -> dict:
    """The report of the module docstring for `replacement` on `contexts` `[n, seq_len]`."""
    bos, _ = special_token_ids(bridge.tokenizer)
    prefixes = list(range(1, replacement.n_prefixes + 1))
    n_layers = len(replacement.layers)
    sums: dict[str, float] = {}
    squared_error = torch.zeros(len(prefixes), n_layers, dtype=torch.float64)
    target_sum, target_squares = 0.0, torch.zeros(n_layers, dtype=torch.float64)
    n_tokens, n_predicted = 0, 0

    def add(name: str, values: Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + float(values.double().sum())

    for start in range(0, len(contexts), batch_size):
        tokens = contexts[start:start + batch_size].to(bridge.cfg.device)
        keep, targets = tokens != bos, tokens[:, 1:]
        predict = keep[:, 1:]
        n_predicted += int(predict.sum())
        names = [hook for pair in replacement.hooks for hook in pair]
        clean_logits, cache = bridge.run_with_cache(tokens, names_filter=names)
        clean = next_token_log_probs(clean_logits)
        add("ce_clean", -clean.gather(-1, targets[..., None])[..., 0][predict])

        # each layer's reconstruction from the clean activations
        y = torch.stack([cache[target][keep].double() for _, target in replacement.hooks])  # [layers, tokens, d]
        n_tokens += y.shape[1]
        target_sum = target_sum + y.sum(1)
        target_squares += y.pow(2).sum((1, 2))
        for g, prefix in enumerate(prefixes):
            replacement.reset()
            for position, (source, _) in enumerate(replacement.hooks):
                y_hat = replacement.reconstruct(position, cache[source][keep].float(), prefix)
                squared_error[g, position] += (y[position] - y_hat.double()).pow(2).sum()

        for name, prefix in [("zero_ablation", None)] + [(f"prefix_{p}", p) for p in prefixes]:
            replacement.reset()
            sources: dict[int, Tensor] = {}  # the replaced run's own source activations, by layer position

            def keep_source(value: Tensor, hook, position: int) -> Tensor:
                sources[position] = value
                return value

            def replace(value: Tensor, hook, position: int, prefix=prefix) -> Tensor:
                if prefix is None:
                    new = torch.zeros_like(value)
                else:
                    new = replacement.reconstruct(position, sources[position].float(), prefix).to(value.dtype)
                return torch.where(keep[..., None], new, value)

            hooks = []
            for position, (source, target) in enumerate(replacement.hooks):
                hooks += [(source, lambda v, hook, p=position: keep_source(v, hook, p)),
                          (target, lambda v, hook, p=position: replace(v, hook, p))]
            log_probs = next_token_log_probs(bridge.run_with_hooks(tokens, fwd_hooks=hooks))
            add(f"ce_{name}", -log_probs.gather(-1, targets[..., None])[..., 0][predict])
            add(f"kl_{name}", (clean.exp() * (clean - log_probs)).sum(-1)[predict])

    mean = {name: total / n_predicted for name, total in sums.items()}
    variance = target_squares - target_sum.pow(2).sum(-1) / n_tokens  # per layer, about its mean
    ce_clean, ce_zero = mean["ce_clean"], mean["ce_zero_ablation"]
    rows = []
    for g, prefix in enumerate(prefixes):
        fvu = squared_error[g] / variance
        ce = mean[f"ce_prefix_{prefix}"]
        rows.append({"prefix": prefix, "fvu": float(fvu.mean()), "fvu_per_layer": fvu.tolist(), "ce_replaced": ce,
                     "ce_loss_score": (ce_zero - ce) / (ce_zero - ce_clean), "kl_div": mean[f"kl_prefix_{prefix}"]})
    return {"kind": "cross_layer_transcoder" if isinstance(replacement, CLTReplacement) else "transcoder_set",
            "layers": list(replacement.layers), "tokens": n_tokens, "predicted_tokens": n_predicted,
            "ce_clean": ce_clean, "ce_zero_ablation": ce_zero, "prefixes": rows, "full": rows[-1]}


def load_replacement(run: str | Path, device: str = "cpu"):
    """`{layer: transcoder}` of a set folder, or the `CrossLayerTranscoder` of a CLT run; None for anything else."""
    from .checkpoint import CONFIG_FILE, load, model_folder
    from .config import TranscoderConfig
    from .sets import is_set, load_set

    if is_set(run):
        return load_set(run, device=device)
    try:
        folder, _ = model_folder(run)
    except FileNotFoundError:
        return None
    config = folder / CONFIG_FILE
    if config.is_file() and TranscoderConfig.load(config).clt_layers:
        return load(folder, device=device)
    return None


def format_replacement(reports: dict[str, dict]) -> str:
    lines = [f"{'model':<24} {'prefix':>6} {'fvu':>8} {'ce_replaced':>12} {'ce_loss_score':>14} {'kl_div':>8}"]
    for name, report in reports.items():
        for row in report["prefixes"]:
            lines.append(f"{name:<24} {row['prefix']:>6} {row['fvu']:>8.4f} {row['ce_replaced']:>12.4f} "
                         f"{row['ce_loss_score']:>14.4f} {row['kl_div']:>8.4f}")
        lines.append(f"{'':<24} clean CE {report['ce_clean']:.4f}, every MLP zeroed {report['ce_zero_ablation']:.4f}, "
                     f"{report['predicted_tokens']:,} predicted tokens")
    return "\n".join(lines)


def replacement_command(args) -> bool:
    """`python -m mtc eval --run DIR` for a set or a CLT: the report above, printed and written to
    `DIR/replacement.json`. Returns False (nothing done) when DIR is neither."""
    import json

    from .checkpoint import atomic_write_bytes
    from .config import resolve_device
    from .evaluate import held_out_contexts
    from .language_model import load_language_model

    device = resolve_device(args.device)
    models = load_replacement(args.run, device=device)
    if models is None:
        return False
    replacement = replacement_for(models)
    cfg = models.cfg if isinstance(models, CrossLayerTranscoder) else next(iter(models.values())).cfg
    dtype = "float32" if cfg.model_dtype == "float16" else cfg.model_dtype
    bridge = load_language_model(cfg.model_name, device=device, dtype=dtype)
    contexts = held_out_contexts(bridge, cfg.dataset, args.tokens, cfg.seq_len, cfg.dataset_split, cfg.text_column)
    report = evaluate_replacement(replacement, bridge, contexts, batch_size=args.batch_size)
    path = Path(args.run) / "replacement.json"
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())
    print(format_replacement({Path(args.run).name: report}))
    print(f"wrote {path}")
    return True
