"""What Matryoshka buys on a toy with ground truth: feature absorption of plain BatchTopK vs Matryoshka transcoders.

Both are trained by the real `mtc.train.Trainer` at equal width, k and token budget on the same batches of the toy of
`mtc.hierarchy` (parents whose children fire only with them, siblings exclusive; x and y two read-outs of the same
features), for several seeds, and evaluated on held-out tokens. The table gives the mean over seeds (± the standard
deviation) of: full-model FVU, FVU of the first prefix, the absorption rate (a parent and its child active but the
parent's latent silent), decoder contamination (a child's latent writing its parent's direction), recovery of the true
directions, and the hierarchy share (later-group latents whose co-firing parent reaches P = 0.9; pseudo-groups by
firing frequency for plain). The issue's goal: Matryoshka's absorption at most half of plain's, with its full-model FVU
within 10% of plain's.

    python benchmarks/toy_hierarchy.py             # 5 seeds: 15 s a seed on an idle CPU core (k 3, prefix weights 1:3)
    python benchmarks/toy_hierarchy.py --sweep     # the training choices that decide it (10-20 minutes)
    python benchmarks/toy_hierarchy.py --k 2 --prefix-weights 1 1 --prefix-sizes 16 40 --json out.json

The defaults meet the goal: mtc's default prefix weights (1 per inner prefix, 3 for the full model: 1:3 here);
equal weights do not (see the sweep). The toy has 2.16 features
active per token: at k 2 the budget binds hard, and both absorb (absorbing a parent into its child saves a latent).

`--selection nested` is a prototype of a proposed change to `mtc.transcoder` (each prefix gets its own BatchTopK over
its own latents, instead of slicing one selection over all latents); it patches the dense reference maths in this
process only and trains with `kernels="dense"`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from mtc.config import default_prefix_weights
from mtc.hierarchy import FeatureTree, ToyHierarchyStore, toy_config, toy_report, train_toy
from mtc.transcoder import MatryoshkaTranscoder, aux_k_loss, batch_topk

COLUMNS = {  # report key -> column title
    "fvu": "FVU", "fvu_prefix_1": "FVU p1", "absorption_rate": "absorption", "contamination": "contam.",
    "recovery_enc": "rec. enc", "recovery_dec": "rec. dec", "hierarchy_share": "hier. share",
    "tree_found": "tree found", "parents_in_first_group": "parents in g1",
}

# the sweep: each entry changes the defaults of the command line (k 3, prefix weights 1:3, groups 8/32) for the
# Matryoshka run, or for both runs where it changes k or the budget
SWEEP = [
    {"name": "k 2, uniform weights", "k": 2, "prefix_weights": [1.0, 1.0]},
    {"name": "k 2, weights 1:3", "k": 2},
    {"name": "k 3, uniform weights", "prefix_weights": [1.0, 1.0]},
    {"name": "weights 3:1", "prefix_weights": [3.0, 1.0]},
    {"name": "weights 1:2", "prefix_weights": [1.0, 2.0]},
    {"name": "weights 1:3 (default)"},
    {"name": "weights 1:7", "prefix_weights": [1.0, 7.0]},
    {"name": "groups 16/24", "prefix_sizes": [16, 40]},
    {"name": "groups 16/24, uniform", "prefix_sizes": [16, 40], "prefix_weights": [1.0, 1.0]},
    {"name": "budget x3", "tokens": 3 * 1024 * 1500},
    {"name": "nested, k 2, uniform", "selection": "nested", "k": 2, "prefix_weights": [1.0, 1.0]},
    {"name": "nested, k 3, uniform", "selection": "nested", "prefix_weights": [1.0, 1.0]},
    {"name": "nested", "selection": "nested"},
    {"name": "nested, weights 1:7", "selection": "nested", "prefix_weights": [1.0, 7.0]},
]


# ---------------------------------------------------------------------- prototype: one BatchTopK per prefix
def nested_selection_losses(self: MatryoshkaTranscoder, x, y, dead_mask):
    """`MatryoshkaTranscoder._dense_losses` with one BatchTopK per prefix: prefix g keeps the k * batch largest
    pre-activations among its own first m_g latents, so an inner prefix always has its full budget and its loss
    reaches the encoder of every latent it would use, even where a later latent won the global selection."""
    linear = self._encoder_matmul(x, self.W_enc, self.b_enc).to(self.W_enc.dtype)
    pre_acts = F.relu(linear)
    y_hats = []
    for m in self.cfg.prefix_sizes:
        z, _ = batch_topk(pre_acts[:, :m], self.cfg.k)
        y_hats.append(z @ self.W_dec[:m] + self.b_dec)
    y_hats = torch.stack(y_hats)  # z is now the whole model's selection, as before
    aux = aux_k_loss(linear, dead_mask, self.cfg.k_aux, self.W_dec, (y - y_hats[-1]).detach())
    tokens, latents = z.detach().nonzero(as_tuple=True)
    return y_hats, aux, (tokens, latents, z[tokens, latents])


@contextmanager
def selection(kind: str):
    """Train with `kind` ("global": mtc as it is; "nested": the prototype above) inside the block."""
    original = MatryoshkaTranscoder._dense_losses
    if kind == "nested":
        MatryoshkaTranscoder._dense_losses = nested_selection_losses
    try:
        yield
    finally:
        MatryoshkaTranscoder._dense_losses = original


# ---------------------------------------------------------------------- runs
def toy_tree(args) -> FeatureTree:
    return FeatureTree(n_parents=args.parents, children_per_parent=args.children, p_parent=args.p_parent,
                       p_child=args.p_child, magnitude_spread=args.spread)


def run_pair(args, out: Path, seed: int, prefix_sizes: list[int], k: int, tokens: int, prefix_weights=None,
             kind: str = "global", plain_cache: dict | None = None) -> dict:
    """Reports of plain and Matryoshka for one seed (plain is reused from `plain_cache` when it has the same k,
    budget and seed)."""
    tree = toy_tree(args)
    d_sae = prefix_sizes[-1]
    group_sizes = [m - prev for prev, m in zip([0, *prefix_sizes[:-1]], prefix_sizes)]
    store = lambda: ToyHierarchyStore(args.d_in, args.d_out, args.batch_size, tree, seed)  # noqa: E731
    key = (seed, k, tokens, d_sae)
    plain_cache = {} if plain_cache is None else plain_cache
    if key not in plain_cache:
        cfg = toy_config(f"plain-{len(plain_cache)}", out, store(), d_sae, [d_sae], k, tokens, lr=args.lr)
        plain_cache[key] = train_toy(cfg, store())
    matryoshka_changes = dict(prefix_weights=prefix_weights, lr=args.lr)
    if kind == "nested":
        matryoshka_changes["kernels"] = "dense"
    name = f"matryoshka-{time.monotonic_ns()}"
    with selection(kind):
        model = train_toy(toy_config(name, out, store(), d_sae, prefix_sizes, k, tokens, **matryoshka_changes), store())
    return {"plain": toy_report(plain_cache[key], store(), group_sizes, args.eval_tokens),
            "matryoshka": toy_report(model, store(), None, args.eval_tokens)}


def summarise(reports: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each table column."""
    out = {}
    for key in COLUMNS:
        values = [r["fvu_per_prefix"][0] if key == "fvu_prefix_1" else r[key] for r in reports]
        values = [v for v in values if v == v]  # NaN: no later-group latent fired
        out[key] = (statistics.fmean(values) if values else float("nan"),
                    statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def verdict(plain: dict, matryoshka: dict) -> dict:
    absorption = matryoshka["absorption_rate"][0] / max(plain["absorption_rate"][0], 1e-12)
    fvu = matryoshka["fvu"][0] / max(plain["fvu"][0], 1e-12)
    return {"absorption_ratio": absorption, "fvu_ratio": fvu, "goal_met": absorption <= 0.5 and fvu <= 1.1}


def print_table(summary: dict[str, dict]) -> None:
    print(f"{'':11s}" + "".join(f"{title:>16s}" for title in COLUMNS.values()))
    for name, stats in summary.items():
        print(f"{name:11s}" + "".join(f"{stats[key][0]:>9.3f} ±{stats[key][1]:5.3f}" for key in COLUMNS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--parents", type=int, default=8)
    parser.add_argument("--children", type=int, default=4, help="children per parent")
    parser.add_argument("--p-parent", type=float, default=0.15)
    parser.add_argument("--p-child", type=float, default=0.8)
    parser.add_argument("--spread", type=float, default=0.0, help="feature magnitudes uniform in [1-s, 1+s]")
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--d-out", type=int, default=112)
    parser.add_argument("--prefix-sizes", type=int, nargs="+", default=None,
                        help="Matryoshka prefixes (default: parents, then all features; the last is d_sae)")
    parser.add_argument("--prefix-weights", type=float, nargs="+", default=None,
                        help="weights of the Matryoshka prefixes' FVUs in the loss (default: mtc's, 1 per inner "
                             "prefix and 3 for the full model)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024 * 1500, help="training budget of each transcoder")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--selection", choices=["global", "nested"], default="global")
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--sweep", action="store_true", help="run the sweep of training choices (SWEEP)")
    parser.add_argument("--json", type=Path, default=Path("runs/toy_hierarchy.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_features = args.parents * (1 + args.children)
    prefix_sizes = args.prefix_sizes or [args.parents, n_features]
    if args.prefix_weights is None:
        args.prefix_weights = default_prefix_weights(len(prefix_sizes))
    if len(args.prefix_weights) != len(prefix_sizes):
        parser.error(f"--prefix-weights needs one weight per prefix ({len(prefix_sizes)}), e.g. "
                     f"{' '.join(['1'] * len(prefix_sizes))} for uniform weights")
    base = dict(prefix_sizes=prefix_sizes, k=args.k, tokens=args.tokens,
                prefix_weights=args.prefix_weights, selection=args.selection)
    variants = [{**base, **v} for v in SWEEP] if args.sweep else [{"name": "settings", **base}]
    tree = toy_tree(args)
    print(f"toy: {args.parents} parents x {args.children} children, {tree.mean_l0:.2f} features active per token; "
          f"d_in {args.d_in}, d_out {args.d_out}; seeds {args.seeds}", file=sys.stderr)

    results, plain_cache = [], {}
    with tempfile.TemporaryDirectory() as out:
        for variant in variants:
            start = time.perf_counter()
            pairs = [run_pair(args, Path(out), seed, variant["prefix_sizes"], variant["k"], variant["tokens"],
                              variant["prefix_weights"], variant["selection"], plain_cache) for seed in args.seeds]
            summary = {name: summarise([p[name] for p in pairs]) for name in ("plain", "matryoshka")}
            result = {"variant": variant, "summary": summary, **verdict(summary["plain"], summary["matryoshka"]),
                      "seconds": time.perf_counter() - start, "reports": pairs}
            results.append(result)
            print(f"\n{variant['name']}: prefixes {variant['prefix_sizes']}, k {variant['k']}, "
                  f"{variant['tokens']:,} tokens, weights {variant['prefix_weights']}, {variant['selection']} "
                  f"selection ({result['seconds']:.0f} s)")
            print_table(summary)
            print(f"absorption ratio {result['absorption_ratio']:.2f} (goal <= 0.5), "
                  f"FVU ratio {result['fvu_ratio']:.2f} (goal <= 1.1): {'met' if result['goal_met'] else 'not met'}",
                  flush=True)
    if args.sweep:
        print(f"\n{'variant':24s}{'plain abs.':>11s}{'M abs.':>8s}{'ratio':>7s}{'plain FVU':>11s}{'M FVU':>8s}"
              f"{'ratio':>7s}{'M hier.':>9s}  goal")
        for r in results:
            p, m = r["summary"]["plain"], r["summary"]["matryoshka"]
            print(f"{r['variant']['name']:24s}{p['absorption_rate'][0]:>11.3f}{m['absorption_rate'][0]:>8.3f}"
                  f"{r['absorption_ratio']:>7.2f}{p['fvu'][0]:>11.4f}{m['fvu'][0]:>8.4f}{r['fvu_ratio']:>7.2f}"
                  f"{m['hierarchy_share'][0]:>9.2f}  {'met' if r['goal_met'] else '-'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {name: str(v) if isinstance(v, Path) else v for name, v in vars(args).items()}
    args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
