"""Absorption and hierarchy of runs trained on one activation cache, side by side: the table of docs/evaluation.md.

`mtc eval --interp` measures the same on held-out tokens of the dataset, after the full reconstruction eval (CE
scores need full forward passes: slow on a CPU). Runs trained by `mtc bench --quality` share a cache whose
held-out rows already hold the source and target activations, so here only the first-letter prompts need the
language model: the co-firing hierarchy and the source decoder come from the cache's held-out rows.

    python benchmarks/absorption_table.py --cache runs/quality/corpus-2m-cache.safetensors \\
        --run runs/quality-2m/demo-matryoshka --run runs/quality-2m/demo-plain --json absorption.json \\
        --plot docs/img/absorption_2m.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mtc
from mtc.cli import interp_report
from mtc.first_letter import absorption_report, plot_absorption, probe_first_letters, sample_words
from mtc.hierarchy import CoFiring, plot_hierarchy
from mtc.language_model import load_language_model
from mtc.quality import ActivationCache, evaluate_cached


def measure(run: Path, cache: ActivationCache, probes: dict, bridge, words: list[str], min_letters: int,
            seed: int) -> dict:
    model = mtc.load(run / "final")
    report = evaluate_cached(model, cache)
    cofiring = CoFiring(model.cfg.d_sae)
    with torch.no_grad():
        for part in cache.eval_source.split(4096):
            cofiring.update(model.encode(part))
    report["hierarchy"] = interp_report(model, cofiring)
    start = time.perf_counter()
    hook = model.cfg.source_hook
    if hook not in probes:  # the letter probe and prompts are shared by every run on the hook
        probes[hook] = probe_first_letters(bridge, hook, words, seed)
    report["absorption"] = absorption_report(model, probes[hook], cache.eval_source, cofiring, min_letters)
    report["absorption"]["seconds"] = time.perf_counter() - start
    return report


def row(name: str, report: dict) -> str:
    a, h = report["absorption"], report["hierarchy"]
    return (f"| {name} | {report['full']['fvu']:.4f} | {a['mean_absorption_fraction']:.3f} | "
            f"{a['mean_full_absorption']:.3f} | {a['mean_split_latents']:.2f} | {a['letters_passing']} | "
            f"{h['hierarchy_share']:.2f} | {h['p_parent_mean']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="the activation cache the runs were trained on")
    parser.add_argument("--run", action="append", required=True, help="a run folder (repeat)")
    parser.add_argument("--words", type=int, default=4000, help="alphabetic tokens sampled (seeded)")
    parser.add_argument("--words-file", help="a JSON list of words to use instead of the sample (e.g. the list "
                        "benchmarks/saebench_absorption.py --write-words wrote, for the agreement check)")
    parser.add_argument("--min-letters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="absorption.json")
    parser.add_argument("--plot", default=None, help="absorption plot (PNG); the hierarchy plot goes beside it")
    args = parser.parse_args()

    cache = ActivationCache.load(args.cache, train=False)  # the held-out rows are all it reads
    first = mtc.load(Path(args.run[0]) / "final").cfg
    bridge = load_language_model(first.model_name)
    words = (json.loads(Path(args.words_file).read_text()) if args.words_file
             else sample_words(bridge.tokenizer, args.words, args.seed))
    probes: dict = {}
    reports = {Path(run).name: measure(Path(run), cache, probes, bridge, words, args.min_letters, args.seed)
               for run in args.run}
    Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    print("| model | FVU | absorption | full absorption | main latents per letter | letters (F1 > 0.6) | "
          "hierarchy share | mean P(parent) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, report in reports.items():
        print(row(name, report))
    for name, report in reports.items():
        a = report["absorption"]
        print(f"{name}: main latents by group {a['main_latents_by_group']}, top absorbers by group "
              f"{a['absorbers_by_group']} ({a['seconds']:.0f} s)")
    if args.plot:
        plot = Path(args.plot)
        print("wrote", plot_absorption(reports, plot), plot_hierarchy(reports, plot.with_name(plot.stem + "_hierarchy.png")))


if __name__ == "__main__":
    main()
