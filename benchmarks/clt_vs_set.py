"""A cross-layer transcoder against a transcoder set with the same latents per layer, trained on the same tokens:
circuit-tracer's replacement and completeness scores on several prompts, at the full width and at prefix 1, and
every MLP replaced at once on held-out text (`mtc.replacement`). The tables of docs/clt.md.

    python benchmarks/clt_vs_set.py --set runs/clt-cmp/cmp --clt runs/clt-cmp/cmp-clt --out runs/clt-cmp/compare

Needs circuit-tracer's venv (`python -m mtc attribute --install .venv-circuit-tracer`, or
$MTC_CIRCUIT_TRACER_PYTHON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from mtc.attribution import attribute_set
from mtc.export import export

PROMPTS = [
    "def add(a, b):\n    return a +",
    "The capital of France is",
    "for i in range(10):\n    print(",
    "import numpy as",
]


def graphs(exports: dict[str, Path], model: str, prompts: list[str], out: Path, python: str | None) -> dict:
    """`{label: [summary per prompt]}` of circuit-tracer's graphs, reused from `out` when already there."""
    found = {}
    for label, folder in exports.items():
        found[label] = []
        for number, prompt in enumerate(prompts):
            graph_dir = out / f"graph-{label.replace(', ', '-').replace(' ', '_')}-{number}"
            summary_file = graph_dir / "summary.json"
            if summary_file.is_file() and json.loads(summary_file.read_text())["prompt"] == prompt:
                found[label].append(json.loads(summary_file.read_text()))
            else:
                found[label].append(attribute_set(folder, model, prompt, graph_dir, python=python))
            summary = found[label][-1]
            print(f"{label} | {prompt!r}: replacement {summary['replacement_score']:.3f}, completeness "
                  f"{summary['completeness_score']:.3f}", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, help="a set folder (train --layers all)")
    parser.add_argument("--clt", required=True, help="a CLT run dir (train --clt --layers all)")
    parser.add_argument("--out", required=True, help="folder for the exports, graphs and compare.json")
    parser.add_argument("--model", default="gemma-3-270m-offline")
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens for every MLP replaced at once")
    parser.add_argument("--python", help="circuit-tracer's python")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    exports = {}
    for kind, run in (("set", args.set), ("CLT", args.clt)):
        for prefix in (None, 1):
            label = f"{kind}, " + ("full" if prefix is None else "prefix 1")
            exports[label] = export("circuit-tracer", run, out / f"export-{kind}-{'full' if prefix is None else 'p1'}",
                                    prefix=prefix)
    found = graphs(exports, args.model, args.prompts, out, args.python)

    from mtc.evaluate import held_out_contexts
    from mtc.language_model import load_language_model
    from mtc.replacement import evaluate_replacement, format_replacement, load_replacement, replacement_for

    replaced = {}
    for kind, run in (("set", args.set), ("CLT", args.clt)):
        models = load_replacement(run)
        cfg = models.cfg if kind == "CLT" else next(iter(models.values())).cfg
        bridge = load_language_model(cfg.model_name)
        contexts = held_out_contexts(bridge, cfg.dataset, args.tokens, cfg.seq_len, cfg.dataset_split, cfg.text_column)
        replaced[kind] = evaluate_replacement(replacement_for(models), bridge, contexts)

    print("\n| export | " + " | ".join(f"prompt {i + 1}" for i in range(len(args.prompts)))
          + " | mean replacement | mean completeness |")
    print("| --- |" + " --- |" * (len(args.prompts) + 2))
    for label, summaries in found.items():
        cells = [f"{s['replacement_score']:.3f} / {s['completeness_score']:.3f}" for s in summaries]
        print(f"| {label} | " + " | ".join(cells) + f" | {mean(s['replacement_score'] for s in summaries):.3f} | "
              f"{mean(s['completeness_score'] for s in summaries):.3f} |")
    print()
    print(format_replacement(replaced))
    (out / "compare.json").write_text(json.dumps({"prompts": args.prompts, "graphs": found, "replacement": replaced},
                                                 indent=2) + "\n")
    print(f"wrote {out / 'compare.json'}")


if __name__ == "__main__":
    main()
