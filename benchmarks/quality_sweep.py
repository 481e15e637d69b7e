"""Train several recipes on one activation cache and print held-out FVU, first-prefix FVU, L0 and dead
shares side by side: the measurements behind the recipe tables of `docs/training.md`.

Each `--run` is one recipe: space-separated `field=value` settings over the preset (any
`TranscoderConfig` field; lists as comma-separated values, `plain` as a shorthand for one prefix). A run that
sets `d_sae` or `k` gets the presets' recipe at that width and k (`mtc.presets.recipe`: learning rate, AuxK
window) and Matryoshka groups, unless it sets those too.
Every run trains with the real `Trainer` on the same cached rows and is evaluated on the same held-out
rows (`mtc.quality`). Results are appended to `--jsonl` as they finish, so a long sweep can be read
while it runs and a killed one loses nothing finished.

    python -m mtc bench --quality                  # writes runs/quality/demo-cache.safetensors once
    python benchmarks/quality_sweep.py --cache runs/quality/demo-cache.safetensors --jsonl sweep.jsonl \\
        --run "lr=2e-3" --run "plain lr=4e-3 dead_after_tokens=10000"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from mtc.config import TranscoderConfig
from mtc.presets import PRESETS, matryoshka_prefixes, recipe
from mtc.quality import ActivationCache, train_cached


def parse_value(text: str):
    """A JSON value (`2e-3`, `true`, `null`), else the text itself (`global`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_run(text: str) -> dict:
    """`"plain lr=2e-3 prefix_sizes=160,480,2560"` -> config overrides (`plain`: one prefix)."""
    types = {f.name: str(f.type) for f in fields(TranscoderConfig)}
    overrides: dict = {}
    for item in text.split():
        if item == "plain":
            overrides["plain"] = True
            continue
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--run {text!r}: {item!r} is not field=value with a TranscoderConfig field")
        is_list = types[name].startswith(("list", "tuple"))
        overrides[name] = [parse_value(v) for v in value.split(",")] if is_list else parse_value(value)
    return overrides


def config_for(preset: str, overrides: dict, cache: ActivationCache, output_dir: Path, index: int) -> TranscoderConfig:
    settings = {**PRESETS[preset], "wandb_mode": "disabled", "drive_dir": "none", "samples_every": 0,
                "checkpoint_every": 10**9, "output_dir": str(output_dir), "run_name": f"sweep-{index}"}
    plain = overrides.pop("plain", False)
    if "d_sae" in overrides or "k" in overrides:  # the recipe at the new width or k, unless set explicitly
        settings.update(recipe(overrides.get("d_sae", settings["d_sae"]), overrides.get("k", settings["k"])))
    settings.update(overrides)
    settings.update(d_in=cache.train_source.shape[1], d_out=cache.train_target.shape[1])
    if plain:
        settings.update(prefix_sizes=[settings["d_sae"]], prefix_weights=None)
    elif "d_sae" in overrides and "prefix_sizes" not in overrides:
        settings["prefix_sizes"] = matryoshka_prefixes(settings["d_sae"])
    return TranscoderConfig.from_dict(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="mtc activation cache (.safetensors)")
    parser.add_argument("--preset", default="demo", help="settings under the overrides (default: demo)")
    parser.add_argument("--run", action="append", required=True, help="one recipe: field=value ... [plain]")
    parser.add_argument("--jsonl", required=True, help="append one line per finished run here")
    parser.add_argument("--output-dir", default="runs/sweep", help="run folders (overwritten)")
    args = parser.parse_args()

    cache = ActivationCache.load(args.cache)
    configs = [config_for(args.preset, parse_run(text), cache, Path(args.output_dir), i)
               for i, text in enumerate(args.run)]  # every recipe is validated before the first trains
    for text, cfg in zip(args.run, configs):
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        report = train_cached(cfg, cache)
        full, first = report["full"], report["prefixes"][0]
        line = {"run": text, "fvu": full["fvu"], "fvu_first": first["fvu"], "first_latents": first["latents"],
                "l0": full["l0"], "dead_pct_eval": full["dead_pct"], "dead_pct_train": report["train"]["dead_pct"],
                "dead_pct_train_100k": report["train"]["dead_pct_100k"],
                "seconds": report["seconds"], "train_tokens": cfg.total_tokens, "d_sae": cfg.d_sae, "k": cfg.k,
                "prefixes": [row["fvu"] for row in report["prefixes"]]}
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{text:<60} fvu {line['fvu']:.4f} first {line['fvu_first']:.4f} l0 {line['l0']:.1f} "
              f"dead {line['dead_pct_eval']:.1f}%/{line['dead_pct_train']:.1f}%/{line['dead_pct_train_100k']:.1f}% "
              f"{line['seconds']:.0f}s", flush=True)
    print(f"wrote {args.jsonl}", file=sys.stderr)


if __name__ == "__main__":
    main()
