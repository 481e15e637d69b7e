"""`python -m mtc train ...`: every `TranscoderConfig` field is a flag (`--d-sae 4096`, `--no-skip-connection`).

Settings are layered: preset < `--config` file < flags. `--layer N` sets the default hook pair of layer
N (and, for Gemma-2-2B layers 8/12/17, picks that preset; for other layers, sizes derived from the
model's width).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .config import TranscoderConfig, resolve_device
from .errors import debug_requested, describe, exit_code, reported

LIST_FIELDS = {"prefix_sizes": int, "prefix_weights": float, "clt_layers": int}


def _field_default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _shown_default(f, default) -> str:
    """The default as `--help` prints it: as typed for lists (`0.9 0.999`), else its repr."""
    if "shown" in f.metadata:
        return f.metadata["shown"]
    return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else repr(default)


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (except `skip`), in one argument group per settings group, each with the field's
    description and default; unset flags are absent from the parsed namespace."""
    from .config import GROUPS

    groups = {g.name: parser.add_argument_group(f"settings: {g.title}") for g in GROUPS}
    for f in fields(TranscoderConfig):
        if f.name in skip:
            continue
        group = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        default = _field_default(f)
        text = f"{f.metadata['help']} (default: {_shown_default(f, default)})".replace("%", "%%")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if f.name in LIST_FIELDS:
            group.add_argument(flag, nargs="+", type=LIST_FIELDS[f.name], **kw)
        elif f.name == "adam_betas":
            group.add_argument(flag, nargs=2, type=float, **kw)
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(flag, type=str if default is None else type(default), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtc", description="Matryoshka transcoders.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one or several transcoders",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--preset", help="named settings (see mtc/presets.py): demo, gemma2-2b-l8, -l12, -l17")
    train.add_argument("--layer", type=int, help="train on this layer's MLP (default hook pair)")
    train.add_argument("--config", action="append", default=[], metavar="JSON",
                       help="a config.json to start from; repeat to train several transcoders from one pass")
    train.add_argument("--resume", default="auto",
                       help="'auto' (newest complete checkpoint, local or mirror), 'never', or a step_<N> folder")
    train.add_argument("--layers", metavar="all|A-B|A,B,C",
                       help="train a set: one transcoder per layer (each layer's default hook pair) from shared passes")
    train.add_argument("--clt", action="store_true",
                       help="with --layers: one cross-layer transcoder over those layers instead of a set (mtc/clt.py)")
    train.add_argument("--memory", metavar="GB|t4|a100-40gb|...",
                       help="--layers: plan passes for this much memory instead of the device's own")
    train.add_argument("--dry-run", action="store_true", help="--layers: print the memory plan and stop")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--debug", action="store_true", help="show the traceback of an error (also: MTC_DEBUG=1)")
    add_config_arguments(train)

    evaluate = commands.add_parser("eval", help="evaluate a trained transcoder on held-out tokens")
    evaluate.add_argument("--run", required=True, help="a run dir, its final/ folder, or a checkpoint folder")
    add_eval_arguments(evaluate)

    samples = commands.add_parser("samples", help="show a latent's top-activating contexts")
    samples.add_argument("--run", required=True, help="a run dir (reads <run>/samples)")
    samples.add_argument("--latent", type=int, nargs="*", help="latent indices (default: a report by group)")
    samples.add_argument("-n", type=int, default=8, help="contexts shown per latent")
    samples.add_argument("--collect", type=int, metavar="BATCHES",
                         help="first run a standalone pass over this many store batches and save the samples")
    samples.add_argument("--device", default="auto")

    compare = commands.add_parser("compare", help="evaluate several transcoders on the same held-out tokens")
    compare.add_argument("runs", nargs="+", help="run dirs / model folders, or Gemma Scope params.npz / Gemma Scope 2 params.safetensors files")
    compare.add_argument("--out", default=".", help="folder for compare.json and compare.png")
    add_eval_arguments(compare)

    from .export import FORMATS, __doc__ as export_doc

    export = commands.add_parser("export", help="write a trained run or set for circuit-tracer, Gemma Scope or SAELens",
                                 description=export_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("format", choices=FORMATS)
    export.add_argument("--run", required=True, help="a set folder (train --layers), a run dir or a model folder")
    export.add_argument("--prefix", type=int, metavar="G", help="only Matryoshka prefix G: the first prefix_sizes[G-1] latents")
    export.add_argument("--out", required=True, help="the folder to write (replaced if it holds an earlier export)")

    from .attribution import add_attribute_parser

    add_attribute_parser(commands)

    bench = commands.add_parser("bench", help="measure throughput: model forward, training pipeline, transcoder step",
                                description=bench_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--preset", help="demo (default on CPU), gemma2-2b-l17 (default on GPU), or any train preset")
    bench.add_argument("--parts", default="forward,pipeline,step", help="comma-separated: forward, pipeline, step")
    bench.add_argument("--fills", type=int, default=3, help="buffer fills timed in forward and pipeline")
    bench.add_argument("--steps", type=int, default=10, help="timed steps of the transcoder step alone")
    bench.add_argument("--rounds", type=int, default=2, help="alternating rounds of forward and pipeline (best counts)")
    bench.add_argument("--dead-fraction", type=float, default=0.5,
                       help="latents kept dead in the step alone, so AuxK costs what it does in a mature run")
    bench.add_argument("--short", action="store_true", help="small buffers, one fill, one round, three steps (CI)")
    bench.add_argument("--synthetic", action="store_true", help="only the transcoder step, on random activations")
    bench.add_argument("--random-weights", action="store_true",
                       help="the preset model's architecture with random weights and the offline corpus (no download)")
    bench.add_argument("--quality", action="store_true",
                       help="train plain and Matryoshka transcoders on the same stored activations and report held-out "
                            "FVU per prefix, L0 and dead share (see mtc/quality.py)")
    bench.add_argument("--cache", metavar="PATH",
                       help="--quality: activation cache to train on; written first if it does not exist "
                            "(default: <output-dir>/<preset>-cache.safetensors)")
    bench.add_argument("--sparsify-python", metavar="PYTHON",
                       help="--quality: also train EleutherAI sparsify's default recipe on the same cache in mtc's units, "
                            "with this python (a virtualenv with eai-sparsify; see benchmarks/quality_sparsify.py)")
    bench.add_argument("--eval-tokens", type=int, default=20_480, help="--quality: held-out tokens in a new cache")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--json", default="bench.json", help="where to write the figures")
    add_config_arguments(bench, skip=("device",))
    return parser


def bench_doc() -> str:
    from . import bench

    return bench.__doc__


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens to evaluate on")
    parser.add_argument("--batch-size", type=int, default=4, help="contexts per forward pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--interp", action="store_true",
                        help="also the co-firing hierarchy of the latents per prefix group (pseudo-groups by firing "
                             "frequency for a plain transcoder; docs/evaluation.md), in the report and a second plot, "
                             "and SAEBench's first-letter absorption on the source hook")
    parser.add_argument("--absorption-words", type=int, default=4000,
                        help="--interp: alphabetic vocabulary tokens sampled for first-letter absorption (0: skip it)")
    parser.add_argument("--absorption-min-letters", type=int, default=20,
                        help="--interp: letters whose probe must reach F1 > 0.6 for the absorption score to count "
                             "(SAEBench: 20)")


def load_for_eval(spec: str, device: str):
    """(name, model, report folder) for a run dir / model folder / Gemma Scope params.npz."""
    from .checkpoint import load, model_folder

    if spec.endswith((".npz", "params.safetensors")) or "gemma-scope" in spec:
        from .gemma_scope import load_gemma_scope

        return Path(spec).parent.name or spec, load_gemma_scope(spec, device=device), None
    folder, run_dir = model_folder(spec)
    return run_dir.name, load(folder, device=device), run_dir


def eval_command(args: argparse.Namespace, specs: list[str]) -> dict[str, dict]:
    from .evaluate import evaluate, held_out_contexts
    from .hierarchy import CoFiring
    from .language_model import load_language_model

    device = resolve_device(args.device)
    loaded = [load_for_eval(spec, device) for spec in specs]
    first = next((model.cfg for _, model, run_dir in loaded if run_dir is not None), loaded[0][1].cfg)
    # float16 (T4 training) can overflow in full forward passes; evaluate such runs in float32
    dtype = "float32" if first.model_dtype == "float16" else first.model_dtype
    bridge = load_language_model(first.model_name, device=device, dtype=dtype)
    contexts = held_out_contexts(bridge, first.dataset, args.tokens, first.seq_len, first.dataset_split,
                                 first.text_column)
    reports, letter_probes = {}, {}  # one letter probe per source hook, shared by the models that read it
    for name, model, run_dir in loaded:
        cofiring = CoFiring(model.cfg.d_sae, device=model.W_enc.device) if args.interp else None
        report = evaluate(model, bridge, contexts, batch_size=args.batch_size, cofiring=cofiring)
        if cofiring is not None:
            report["hierarchy"] = interp_report(model, cofiring)
            if args.absorption_words:
                from .first_letter import absorption_report, probe_first_letters, sample_words, source_activations

                hook = model.cfg.source_hook
                if hook not in letter_probes:  # the probe and the held-out source activations, once per hook
                    words = sample_words(bridge.tokenizer, args.absorption_words)
                    letter_probes[hook] = (probe_first_letters(bridge, hook, words),
                                           source_activations(bridge, hook, contexts, args.batch_size))
                probe, x = letter_probes[hook]
                report["absorption"] = absorption_report(model, probe, x, cofiring, args.absorption_min_letters)
        reports[name if name not in reports else f"{name}-{len(reports)}"] = report
        report["_run_dir"] = str(run_dir) if run_dir is not None else None
    return reports


def interp_report(model, cofiring) -> dict:
    """The hierarchy of a Matryoshka's own groups, or of a plain transcoder's latents cut by frequency into the
    groups the presets would give a Matryoshka of its width."""
    from .hierarchy import hierarchy_report
    from .presets import matryoshka_prefixes

    cfg = model.cfg
    pseudo = cfg.n_prefixes == 1
    sizes = matryoshka_prefixes(cfg.d_sae) if pseudo else cfg.prefix_sizes
    group_sizes = [b - a for a, b in zip([0, *sizes], sizes)]
    return hierarchy_report(cofiring, group_sizes, model.W_dec, pseudo_groups=pseudo)


def write_reports(reports: dict[str, dict], folder: Path, stem: str) -> None:
    from .checkpoint import atomic_write_bytes
    from .evaluate import format_table, plot_matryoshka_curve

    folder.mkdir(parents=True, exist_ok=True)
    clean = {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in reports.items()}
    report = clean if len(clean) > 1 else next(iter(clean.values()))
    atomic_write_bytes(folder / f"{stem}.json", (json.dumps(report, indent=2) + "\n").encode())
    plot_matryoshka_curve(clean, folder / f"{stem}.png")
    print(format_table(clean))
    print(f"wrote {folder / (stem + '.json')} and {folder / (stem + '.png')}")
    if any("hierarchy" in r for r in clean.values()):
        from .hierarchy import plot_hierarchy

        print(f"wrote {plot_hierarchy(clean, folder / f'{stem}_hierarchy.png')}")
    if any("absorption" in r for r in clean.values()):
        from .first_letter import plot_absorption

        print(f"wrote {plot_absorption(clean, folder / f'{stem}_absorption.png')}")


def samples_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .checkpoint import model_folder
    from .language_model import resolve_model_path
    from .samples import load_samples

    folder, run_dir = model_folder(args.run)
    if args.collect:
        collect_command(folder, run_dir, args.collect, resolve_device(args.device))
    from .checkpoint import load

    cfg = load(folder).cfg
    samples = load_samples(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model_name))
    if args.latent:
        for latent in args.latent:
            if not 0 <= latent < samples.d_sae:
                raise ValueError(f"--latent {latent} is out of range; this transcoder has latents 0..{samples.d_sae - 1}")
        print(samples.report(tokenizer, args.latent, n=args.n))
    else:
        print(samples.group_report(tokenizer, cfg.prefix_sizes, n=args.n))
    return 0


def collect_command(folder: Path, run_dir: Path, n_batches: int, device: str) -> None:
    """A standalone samples pass over a trained model (JumpReLU latents, the run's training stream)."""
    from .activations import build_store
    from .checkpoint import load
    from .language_model import load_language_model
    from .samples import collect_samples, context_lookup

    model = load(folder, device=device)
    cfg = model.cfg
    bridge = load_language_model(cfg.model_name, device=device, dtype=cfg.model_dtype)
    store = build_store(bridge, [cfg], buffer_device=device)
    collector = collect_samples(model, store, n_batches, top_n=cfg.samples_top_n)
    meta = {"model_name": cfg.model_name, "source_hook": cfg.source_hook, "target_hook": cfg.target_hook,
            "prefix_sizes": cfg.prefix_sizes, "pass": "standalone"}
    path = collector.save(run_dir / "samples", context_lookup(store.make_contexts), meta=meta)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = debug_requested() or getattr(args, "debug", False)
    try:
        if args.command == "train":
            from .clt_train import train_clt_command
            from .launch import train_command

            return train_clt_command(args) if args.clt else train_command(args)
        if args.command == "eval":
            from .replacement import replacement_command

            if replacement_command(args):  # a set or a CLT: every MLP replaced at once
                return 0
            if args.run.endswith(".npz"):
                raise ValueError("`eval --run` takes a run dir or model folder; evaluate a Gemma Scope params.npz "
                                 "with `python -m mtc compare <run dir> <params.npz>`")
            reports = eval_command(args, [args.run])
            write_reports(reports, Path(next(iter(reports.values()))["_run_dir"]), "eval")
            return 0
        if args.command == "samples":
            return samples_command(args)
        if args.command == "bench":
            from .bench import bench_command

            return bench_command(args)
        if args.command == "export":
            from .export import export

            print(f"wrote {export(args.format, args.run, args.out, args.prefix)}")
            return 0
        if args.command == "attribute":
            from .attribution import attribute_command

            return attribute_command(args)
        if args.command == "compare":
            write_reports(eval_command(args, args.runs), Path(args.out), "compare")
            return 0
    except Exception as err:
        if debug or not reported(err):
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return exit_code(err)
    return 2
