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

from .config import TranscoderConfig
from .errors import UsageError, debug_requested, describe, exit_code, reported

LIST_FIELDS = {"prefix_sizes": int, "prefix_weights": float}


def _field_default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (except `skip`); unset flags are absent from the parsed namespace."""
    group = parser.add_argument_group("run settings (TranscoderConfig fields)")
    for f in fields(TranscoderConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = _field_default(f)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"default: {default!r}")
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
    compare.add_argument("runs", nargs="+", help="run dirs / model folders, or Gemma Scope params.npz files")
    compare.add_argument("--out", default=".", help="folder for compare.json and compare.png")
    add_eval_arguments(compare)

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


def model_folder(path: str) -> tuple[Path, Path]:
    """(folder holding model.safetensors + config.json, run dir to write reports into) for `--run`."""
    from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, list_checkpoints

    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else (
            path.parent if path.name == "final" else path)
        return path, run_dir
    if (path / "final" / WEIGHTS_FILE).is_file():
        return path / "final", path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1], path
    raise FileNotFoundError(f"{path} holds no trained transcoder (no final/, no checkpoints/step_<N>, no "
                            f"model.safetensors); pass a run dir written by `python -m mtc train`")


def load_for_eval(spec: str, device: str):
    """(name, model, report folder) for a run dir / model folder / Gemma Scope params.npz."""
    from .checkpoint import load

    if spec.endswith(".npz") or "gemma-scope" in spec:
        from .interop import load_gemma_scope

        return Path(spec).parent.name or spec, load_gemma_scope(spec, device=device), None
    folder, run_dir = model_folder(spec)
    return run_dir.name, load(folder, device=device), run_dir


def eval_command(args: argparse.Namespace, specs: list[str]) -> dict[str, dict]:
    from .evaluate import evaluate, held_out_contexts
    from .language_model import load_language_model

    device = resolve_device(args.device)
    loaded = [load_for_eval(spec, device) for spec in specs]
    first = next((model.cfg for _, model, run_dir in loaded if run_dir is not None), loaded[0][1].cfg)
    # float16 (T4 training) can overflow in full forward passes; evaluate such runs in float32
    dtype = "float32" if first.model_dtype == "float16" else first.model_dtype
    bridge = load_language_model(first.model_name, device=device, dtype=dtype)
    contexts = held_out_contexts(bridge, first.dataset, args.tokens, first.seq_len, first.dataset_split,
                                 first.text_column)
    reports = {}
    for name, model, run_dir in loaded:
        report = evaluate(model, bridge, contexts, batch_size=args.batch_size)
        reports[name if name not in reports else f"{name}-{len(reports)}"] = report
        report["_run_dir"] = str(run_dir) if run_dir is not None else None
    return reports


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


def config_settings(args: argparse.Namespace, d_model: int | None = None) -> list[dict]:
    """The settings of every transcoder to train. Without `d_model` (before the model is loaded) a
    `--layer` that has no preset keeps the config defaults for sizes; with it, sizes follow the width."""
    from .language_model import default_hooks
    from .presets import PRESETS, defaults_for_layer, matryoshka_prefixes, preset_for

    flags = {f.name: getattr(args, f.name) for f in fields(TranscoderConfig) if hasattr(args, f.name)}
    name = preset_for(args.preset, args.layer, flags.get("model_name"))
    base = dict(PRESETS[name]) if name else {}
    layer_hooks = {}
    if args.layer is not None and args.layer < 0:
        raise UsageError(f"--layer {args.layer}: layers are numbered from 0; pass a layer of the model")
    if args.layer is not None:
        if not name and d_model is not None:
            model_name = flags.get("model_name", TranscoderConfig.model_name)
            base.update(defaults_for_layer(args.layer, d_model, model_name))
        layer_hooks = dict(zip(("source_hook", "target_hook"), default_hooks(args.layer)))
    files = [read_config_file(path) for path in args.config] or [{}]
    settings = []
    for data in files:
        chosen = {**data, **flags}  # what the user set explicitly
        merged = {**base, **data, **layer_hooks, **flags}
        if "d_sae" in chosen and "prefix_sizes" not in chosen and "prefix_sizes" in base:
            merged["prefix_sizes"] = matryoshka_prefixes(merged["d_sae"])
        settings.append(merged)
    return settings


def read_config_file(path: str) -> dict:
    """The settings in a `--config` file, or a `UsageError` naming the file and what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: file not found; check the path (a run's settings are in "
                         f"<run_dir>/config.json)") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a folder; pass its config.json") from None
    except OSError as err:
        raise UsageError(f"--config {path}: cannot be read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {path}: not valid JSON ({err}); fix the file or pass another") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: must hold one JSON object of TranscoderConfig fields "
                         f'({{"d_sae": 4096, ...}}), got a JSON {type(data).__name__}')
    return data


def make_configs(settings: list[dict], sources: list[str]) -> list[TranscoderConfig]:
    """Validated configs; a bad value names its `--config` file and, where the config's own message does
    not, the field."""
    configs = []
    for data, source in zip(settings, sources):
        try:
            configs.append(TranscoderConfig.from_dict(data))
        except (TypeError, ValueError) as err:
            message = str(err)
            if not message.startswith("TranscoderConfig"):
                bad = [name for name, value in data.items() if _breaks_config(name, value)]
                field = f"TranscoderConfig.{bad[0]}: {data[bad[0]]!r} is not a valid value" if bad else "settings"
                message = f"{field} ({message}); see `python -m mtc train --help` for each field's type"
            raise UsageError(f"{source}: {message}" if source else message) from None
    return configs


def _breaks_config(name: str, value) -> bool:
    """Whether `value` alone (other fields at their defaults) fails with an error that names no field."""
    try:
        TranscoderConfig.from_dict({name: value})
    except (TypeError, ValueError) as err:
        return not str(err).startswith("TranscoderConfig")
    return False


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def train_command(args: argparse.Namespace) -> int:
    from .colab import resolve_mirror_dir
    from .lock import hold
    from .preflight import check_before_model

    sources = [f"--config {path}" for path in args.config] or [""]
    configs = make_configs(config_settings(args), sources)  # validate before loading a model
    mirrors = [resolve_mirror_dir(cfg.drive_dir, cfg.run_name) for cfg in configs]
    check_before_model(configs, args.resume, mirrors)
    with hold([cfg.run_dir for cfg in configs]):  # one process per run dir, refused before the model loads
        return train_locked(args, configs, sources)


def train_locked(args: argparse.Namespace, configs: list[TranscoderConfig], sources: list[str]) -> int:
    from .activations import build_store
    from .colab import resolve_mirror_dir
    from .language_model import fit_config_to_model, load_language_model
    from .train import DIVERGING_FVU, NonFiniteError, StopRequested, Trainer, diverged

    device = resolve_device(configs[0].device)
    bridge = load_language_model(configs[0].model_name, device=device, dtype=configs[0].model_dtype)
    configs = make_configs(config_settings(args, d_model=bridge.cfg.d_model), sources)
    configs = [fit_config_to_model(cfg, bridge) for cfg in configs]
    for cfg in configs:
        print(f"{cfg.run_name}: {cfg.model_name} {cfg.source_hook} -> {cfg.target_hook}, d_in={cfg.d_in} "
              f"d_out={cfg.d_out} d_sae={cfg.d_sae} prefixes={cfg.prefix_sizes} k={cfg.k}, "
              f"{cfg.total_steps} steps of {cfg.batch_size} tokens on {device}", file=sys.stderr)
    store = build_store(bridge, configs, buffer_device=device)
    mirrors = [resolve_mirror_dir(cfg.drive_dir, cfg.run_name) for cfg in configs]
    trainer = Trainer(configs, store, device=device, mirror_dirs=mirrors, resume=args.resume,
                      progress=not args.no_progress)
    try:
        results = trainer.train()
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except StopRequested as stop:
        print(str(stop), file=sys.stderr)
        return 128 + stop.signum
    for cfg, metrics, mirror in zip(configs, results, mirrors):
        prefixes = " ".join(f"{metrics[f'fvu/prefix_{g}']:.3f}" for g in range(1, cfg.n_prefixes + 1))
        print(f"{cfg.run_name}: final fvu={metrics['fvu']:.4f} (per prefix {prefixes}) l0={metrics['l0']:.1f} "
              f"dead={metrics['dead_pct']:.1f}% tokens/s={metrics['tokens_per_s']:,.0f}")
        print(f"run_dir: {cfg.run_dir}")
        if mirror is not None:
            print(f"mirror_dir: {mirror}")
    failed = [run.cfg.run_name for run in trainer.runs if diverged(run)]
    if failed:
        print(f"error: {', '.join(failed)} diverged (FVU above {DIVERGING_FVU:g}, worse than predicting the mean, "
              "and not improving at the end); the weights and checkpoints are kept, but retrain with a lower lr "
              "or a longer warmup", file=sys.stderr)
        return 1
    return 0


def samples_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

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


def bench_command(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, format_report, run_benchmark, write_report
    from .presets import PRESETS

    device = resolve_device(args.device)
    preset = args.preset or ("gemma2-2b-l17" if device == "cuda" and not args.quality else "demo")
    if args.quality:
        return quality_command(args, preset, device)
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    unknown = set(parts) - {"forward", "pipeline", "step"}
    if unknown or not parts:
        raise ValueError(f"--parts: unknown part(s) {sorted(unknown)}; choose from forward, pipeline, step")
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = config_overrides(args)
    if args.random_weights:
        overrides.setdefault("dataset", "pydoc")  # the text does not matter for throughput
    settings = BenchSettings(preset=preset, device=device, parts=("step",) if args.synthetic else parts,
                             fills=1 if args.short else args.fills, steps=3 if args.short else args.steps,
                             rounds=1 if args.short else args.rounds,
                             dead_fraction=args.dead_fraction, short=args.short, synthetic=args.synthetic,
                             random_weights=args.random_weights, overrides=overrides)
    report = run_benchmark(settings)
    print(format_report(report))
    write_report(report, Path(args.json))
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def config_overrides(args: argparse.Namespace) -> dict:
    """The `TranscoderConfig` fields set on a bench command line (its `--device` is the bench's own)."""
    return {f.name: getattr(args, f.name) for f in fields(TranscoderConfig)
            if f.name != "device" and hasattr(args, f.name)}


def quality_command(args: argparse.Namespace, preset: str, device: str) -> int:
    from .checkpoint import atomic_write_bytes
    from .presets import PRESETS
    from .quality import ActivationCache, collect_cache, format_quality, run_quality

    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = config_overrides(args)
    settings = {**PRESETS[preset], "wandb_mode": "disabled", "drive_dir": "none", "samples_every": 0,
                "output_dir": "runs/quality", **overrides}
    cfg = TranscoderConfig.from_dict(settings)
    cache_path = Path(args.cache or Path(cfg.output_dir) / f"{preset}-cache.safetensors")
    if cache_path.is_file():
        cache = ActivationCache.load(cache_path)
    else:
        from .language_model import fit_config_to_model, load_language_model

        bridge = load_language_model(cfg.model_name, device=device, dtype=cfg.model_dtype)
        cfg = fit_config_to_model(cfg, bridge)
        cache = collect_cache(bridge, cfg, args.eval_tokens)
        cache.save(cache_path)
        print(f"wrote the activation cache {cache_path}", file=sys.stderr)
    cfg = cfg.replace(d_in=cache.train_source.shape[1], d_out=cache.train_target.shape[1])
    reports = run_quality(cfg, cache, device=device)
    print(format_quality(reports))
    atomic_write_bytes(Path(args.json), (json.dumps(reports, indent=2) + "\n").encode())
    print(f"\nwrote {args.json}; the same cache trains EleutherAI's sparsify with "
          f"benchmarks/quality_sparsify.py --cache {cache_path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = debug_requested() or getattr(args, "debug", False)
    try:
        if args.command == "train":
            return train_command(args)
        if args.command == "eval":
            if args.run.endswith(".npz"):
                raise ValueError("`eval --run` takes a run dir or model folder; evaluate a Gemma Scope params.npz "
                                 "with `python -m mtc compare <run dir> <params.npz>`")
            reports = eval_command(args, [args.run])
            write_reports(reports, Path(next(iter(reports.values()))["_run_dir"]), "eval")
            return 0
        if args.command == "samples":
            return samples_command(args)
        if args.command == "bench":
            return bench_command(args)
        if args.command == "compare":
            write_reports(eval_command(args, args.runs), Path(args.out), "compare")
            return 0
    except Exception as err:
        if debug or not reported(err):
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return exit_code(err)
    return 2
