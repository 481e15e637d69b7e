"""`python -m mtc train`: from the parsed flags to trained transcoders, each decision made once, in this order.

A run (`train_command`):

1. settings layered: preset < `--config` file < `--layer`'s hooks < flags (`read_sources`, `layered_settings`);
2. the model's shape read from its config.json, no weights (`read_shape`): `--layer N` without a preset derives
   its sizes from the model's width, and `d_in`/`d_out` are the hooks' widths where the shape tells them
   (`mtc.language_model.hook_width`);
3. the configs built and validated, once (`make_configs`);
4. the mirror dirs resolved, the checks that need no model (`mtc.launch_checks`), and where to resume from
   (`mtc.resume.decide_resume`);
5. this process joined to torchrun's group, when launched by it (`mtc.parallel.join`), and the run dirs locked
   by the writing process (`mtc.lock.hold`);
6. the model loaded, and the configs' widths checked against it (`check_widths`: a check, not a rebuild);
7. the store chosen (`mtc.parallel.store_for`), the `Trainer` run, the final figures printed (`run_and_report`).

A set (`--layers`, `train_set_command`) goes the same way with one shared config (`set_config`), a memory plan,
and one `Trainer` per pass (`mtc.sets.train_set`); where each pass resumes is decided before the model loads,
after the ranks agree on their checkpoints (`mtc.sets.decide_pass_resume`). Every refusal is a `UsageError`
naming the flag, file or field and the fix, raised before the model loads unless only the loaded model can tell (a hook it lacks, a layer out of range).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .config import TranscoderConfig, resolve_device
from .errors import UsageError
from .launch_checks import check_before_model, check_model_path

if TYPE_CHECKING:
    from .memory import ModelShape
    from .parallel import Process
    from .resume import ResumePoint

HOOK_OF = {"d_in": "source_hook", "d_out": "target_hook"}  # the config fields holding each hook's width


# ---------------------------------------------------------------------- settings
@dataclass
class Sources:
    """What a launch's settings are layered from, each read once: the preset's fields, each `--config` file's
    (`[{}]` without one) and the flags'."""

    preset_name: str | None
    preset: dict
    files: list[dict]
    flags: dict

    @property
    def model_name(self) -> str:
        """The model of the launch (the first config's: the transcoders of a launch share one model)."""
        return {**self.preset, **self.files[0], **self.flags}.get("model_name", TranscoderConfig.model_name)


def flag_settings(args: argparse.Namespace) -> dict:
    """The `TranscoderConfig` fields given as flags (unset flags are absent from the namespace)."""
    return {f.name: getattr(args, f.name) for f in fields(TranscoderConfig) if hasattr(args, f.name)}


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


def read_sources(args: argparse.Namespace) -> Sources:
    """The preset (named, or Gemma-2-2B's for `--layer` 8/12/17), the `--config` files and the flags."""
    from .presets import PRESETS, preset_for

    flags = flag_settings(args)
    name = preset_for(args.preset, args.layer, flags.get("model_name"))
    if args.layer is not None and args.layer < 0:
        raise UsageError(f"--layer {args.layer}: layers are numbered from 0; pass a layer of the model")
    files = [read_config_file(path) for path in args.config] or [{}]
    return Sources(name, dict(PRESETS[name]) if name else {}, files, flags)


def layered_settings(args: argparse.Namespace, sources: Sources, d_model: int | None) -> list[dict]:
    """The settings of every transcoder to train, one per `--config` file: preset < file < `--layer`'s hook
    pair < flags. A `--layer` without a preset gets sizes for the model's width `d_model` (the config's defaults
    when it is unknown); a `d_sae` set explicitly over a preset gets Matryoshka prefixes to match."""
    from .language_model import default_hooks
    from .presets import defaults_for_layer, matryoshka_prefixes

    base, layer_hooks = dict(sources.preset), {}
    if args.layer is not None:
        if not sources.preset_name and d_model is not None:
            model_name = sources.flags.get("model_name", TranscoderConfig.model_name)
            base.update(defaults_for_layer(args.layer, d_model, model_name))
        layer_hooks = dict(zip(("source_hook", "target_hook"), default_hooks(args.layer)))
    settings = []
    for data in sources.files:
        chosen = {**data, **sources.flags}  # what the user set explicitly
        merged = {**base, **data, **layer_hooks, **sources.flags}
        if "d_sae" in chosen and "prefix_sizes" not in chosen and "prefix_sizes" in base:
            merged["prefix_sizes"] = matryoshka_prefixes(merged["d_sae"])
        settings.append(merged)
    return settings


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


# ---------------------------------------------------------------------- the model's shape and hook widths
def read_shape(name: str) -> ModelShape:
    """The shape of model `name` from its config.json alone (no weights): a missing local folder is named as
    the `model_name` field, and a hub config that cannot be fetched is explained as a failed load would be."""
    from .language_model import explain_load_error
    from .memory import model_shape

    check_model_path(name)
    try:
        return model_shape(name)
    except RuntimeError as err:
        raise RuntimeError(explain_load_error(name, err.__cause__ or err)) from err


def with_widths(settings: dict, shape: ModelShape) -> dict:
    """`settings` with `d_in`/`d_out` set to their hooks' widths where the shape tells them; elsewhere a width
    the user gave is kept, and one not given stays out (the loaded model tells it)."""
    from .language_model import hook_width

    sized = dict(settings)
    for field, hook_field in HOOK_OF.items():
        width = hook_width(sized.get(hook_field, getattr(TranscoderConfig, hook_field)), shape.d_model, shape.d_mlp)
        if width is not None:
            sized[field] = width
    return sized


def check_widths(configs: list[TranscoderConfig], bridge, shape: ModelShape,
                 unread: list[tuple[str, ...]] | None = None) -> list[TranscoderConfig]:
    """`configs` checked against the loaded model: every hook exists (`validate_hooks`) and `d_in`/`d_out`
    equal the hooks' widths. A width in `unread` (per config, the fields neither the shape nor the user
    gave) is filled in from the model; any other that differs is a `UsageError`."""
    from .language_model import hook_width, hook_widths

    unread = unread or [()] * len(configs)
    widths = hook_widths(bridge, list(dict.fromkeys(h for cfg in configs for h in (cfg.source_hook, cfg.target_hook))))
    checked = []
    for cfg, missing in zip(configs, unread):
        if missing:
            cfg = cfg.replace(**{field: widths[getattr(cfg, HOOK_OF[field])] for field in missing})
        for field in HOOK_OF:
            hook, value = getattr(cfg, HOOK_OF[field]), getattr(cfg, field)
            if widths[hook] == value:
                continue
            if hook_width(hook, shape.d_model, shape.d_mlp) is None:  # the user's width for a hook the shape cannot tell
                raise UsageError(f"{field}: hook {hook} of {cfg.model_name} is {widths[hook]} wide, not {value}; "
                                 f"set --{field.replace('_', '-')} {widths[hook]}, or leave {field} out to read it "
                                 f"from the model")
            raise UsageError(f"{field}: hook {hook} of {cfg.model_name} is {widths[hook]} wide once loaded, but its "
                             f"config.json gives {value}; mtc cannot train this hook of this model (please report it "
                             f"with the model's name)")
        checked.append(cfg)
    return checked


# ---------------------------------------------------------------------- one run
@dataclass
class RunSettings:
    """The configs of a launch, built once before the model loads, and the model's shape."""

    configs: list[TranscoderConfig]
    unread: list[tuple[str, ...]]  # per config, the widths only the loaded model can tell (see `check_widths`)
    shape: ModelShape


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The configs `python -m mtc train` (without `--layers`) trains, validated, from the flags and the
    model's config file alone: what a notebook shows before anything is downloaded."""
    sources = read_sources(args)
    labels = [f"--config {path}" for path in args.config] or [""]
    try:
        shape = read_shape(sources.model_name)
    except UsageError:  # no model to size the configs: a bad setting is still named first, as it would be
        make_configs(layered_settings(args, sources, d_model=None), labels)
        raise
    settings = [with_widths(data, shape) for data in layered_settings(args, sources, shape.d_model)]
    configs = make_configs(settings, labels)
    return RunSettings(configs, [tuple(f for f in HOOK_OF if f not in data) for data in settings], shape)


def train_command(args: argparse.Namespace) -> int:
    """`python -m mtc train`: decide everything a run needs before the model loads, then train (a set with
    `--layers`)."""
    if args.layers is not None:
        return train_set_command(args)
    if args.dry_run or args.memory:
        raise UsageError("--dry-run and --memory plan a set; add --layers (all, A-B or A,B,C)")
    from .colab import resolve_mirror_dir
    from .lock import hold
    from .parallel import join, leave
    from .resume import decide_resume

    run = run_settings(args)
    configs = run.configs
    mirrors = [resolve_mirror_dir(cfg.drive_dir, cfg.run_name) for cfg in configs]
    check_before_model(configs)
    resume = decide_resume(configs, args.resume, mirrors)
    process = join(configs[0].device)  # under torchrun: data-parallel, each rank trains on its share of every batch
    try:
        with hold([cfg.run_dir for cfg in configs] if process.writer else []):  # one process per run dir
            return train_on(args, run, mirrors, resume, process)
    finally:
        leave(process)


def train_on(args: argparse.Namespace, run: RunSettings, mirrors: list[Path | None], resume: ResumePoint | None,
             process: Process) -> int:
    """Load the model, check the configs' widths against it, and train them from one store."""
    from .language_model import load_language_model, model_dtype_of
    from .parallel import store_for
    from .train import Trainer

    first = run.configs[0]
    bridge = load_language_model(first.model_name, device=process.device, dtype=first.model_dtype)
    configs = check_widths(run.configs, bridge, run.shape, run.unread)
    for cfg in configs:
        print(f"{cfg.run_name}: {cfg.model_name} {cfg.source_hook} -> {cfg.target_hook}, d_in={cfg.d_in} "
              f"d_out={cfg.d_out} d_sae={cfg.d_sae} prefixes={cfg.prefix_sizes} k={cfg.k}, "
              f"{cfg.total_steps} steps of {cfg.batch_size} tokens on {process.device} (language model in "
              f"{model_dtype_of(bridge)})", file=sys.stderr)
    store, configs = store_for(bridge, configs, process)
    trainer = Trainer(configs, store, device=process.device, mirror_dirs=mirrors, resume=resume,
                      progress=not args.no_progress, process=process)
    return run_and_report(trainer.train, lambda: trainer.runs if process.writer else [])


# ---------------------------------------------------------------------- a set
def set_config(args: argparse.Namespace) -> tuple[TranscoderConfig, ModelShape]:
    """(the shared config of a set, the model's shape) for `train --layers`, from the model's config file alone.
    Each layer gets its own default hook pair (as wide as the residual stream), so hooks and `--layer` are
    refused."""
    from .presets import defaults_for_layer

    sources = read_sources(args)
    explicit = {**sources.files[0], **sources.flags}
    for name, problem in (("layer", args.layer is not None), ("config", len(args.config) > 1),
                          ("source_hook", "source_hook" in explicit), ("target_hook", "target_hook" in explicit)):
        if problem:
            raise UsageError(f"--{name.replace('_', '-')} cannot be combined with --layers: a set trains each layer's "
                             f"default hook pair (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out) from one config")
    model_name = sources.model_name
    shape = read_shape(model_name)
    settings = layered_settings(args, sources, shape.d_model)[0]
    if not args.preset and "d_sae" not in explicit:  # sizes from the model's width, as --layer does
        derived = defaults_for_layer(0, shape.d_model, model_name)
        settings.update({k: v for k, v in derived.items() if k not in ("source_hook", "target_hook", "run_name")
                         and k not in explicit})
    if "run_name" not in explicit:
        settings["run_name"] = f"{settings.get('run_name', TranscoderConfig.run_name)}-set"
    settings.update(d_in=shape.d_model, d_out=shape.d_model)
    return make_configs([settings], [f"--config {args.config[0]}" if args.config else ""])[0], shape


def train_set_command(args: argparse.Namespace) -> int:
    """`train --layers`: plan the set's passes before loading anything, print the plan, then train."""
    from .colab import resolve_mirror_dir
    from .language_model import load_language_model
    from .lock import hold
    from .memory import device_capacity, memory_plan
    from .parallel import Process, join, leave
    from .resume import decide_resume
    from .sets import TranscoderSet, decide_pass_resume, is_set, parse_layers, train_set

    if args.resume not in ("auto", "never"):
        raise UsageError(f"--resume {args.resume}: a set resumes with 'auto' (or starts afresh with 'never')")
    base, shape = set_config(args)
    tset = TranscoderSet(base, parse_layers(args.layers, shape.n_layers))
    if is_set(tset.set_dir):
        tset.check_matches(TranscoderSet.load(tset.set_dir))
    mirror_root = resolve_mirror_dir(base.drive_dir, base.run_name)
    # under torchrun: layer-parallel, each process trains a share of every pass (a dry run joins nothing)
    process = Process(device=resolve_device(base.device)) if args.dry_run else join(base.device)
    try:
        finished, interrupted, fresh = tset.progress(mirror_root, fetch=process.writer)
        plan = memory_plan(tset.config, shape, fresh or tset.layers, *device_capacity(process.device, args.memory),
                           ranks=process.world, on_cpu=process.device == "cpu" and not args.memory)
        passes = ([interrupted] if interrupted else []) + (plan.passes if fresh else [])
        if process.writer:
            print(plan.format())
            if finished:
                print(f"finished already: layers {','.join(map(str, finished))}")
            if interrupted:
                print(f"resuming the interrupted pass first: layers {','.join(map(str, interrupted))}")
            if args.dry_run or not passes:
                print(f"set_dir: {tset.set_dir}" + ("" if passes else " (every layer is finished)"))
        if args.dry_run or not passes:
            return 0
        configs = [tset.layer_config(layer) for layer in tset.layers]
        check_before_model(configs)
        with hold([tset.set_dir] if process.writer else []):
            if args.resume == "never":  # no layer of the set may hold checkpoints, finished ones included
                decide_resume(configs, "never", [tset.mirror_dir(layer, mirror_root) for layer in tset.layers])
                resumes = [None] * len(passes)
            else:
                resumes = [decide_pass_resume(tset, layers, process, mirror_root, "auto") for layers in passes]
            bridge = load_language_model(base.model_name, device=process.device, dtype=base.model_dtype)
            check_widths(configs, bridge, shape)  # every layer's hooks exist and are as wide as the shape said
            runs = []
            return run_and_report(lambda: runs.extend(train_set(tset, passes, resumes, bridge, process, mirror_root,
                                                                progress=not args.no_progress)),
                                  lambda: runs, set_dir=tset.set_dir if process.writer else None,
                                  set_mirror=mirror_root)
    finally:
        leave(process)


# ---------------------------------------------------------------------- the report
def run_and_report(train: Callable[[], object], runs: Callable[[], list], set_dir: Path | None = None,
                   set_mirror: Path | None = None) -> int:
    """Call `train()`, then print each run's final figures and where it is; the exit status says whether
    training finished (0), stopped on a signal (128 + signal) or failed (1: non-finite or diverged)."""
    from .train import DIVERGING_FVU, NonFiniteError, StopRequested, diverged
    from .transcoder import DEAD_SHARE_TOKENS

    try:
        train()
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except StopRequested as stop:
        print(str(stop), file=sys.stderr)
        return 128 + stop.signum
    for run in runs():
        cfg, metrics = run.cfg, run.last_metrics
        prefixes = " ".join(f"{metrics[f'fvu/prefix_{g}']:.3f}" for g in range(1, cfg.n_prefixes + 1))
        print(f"{cfg.run_name}: final fvu={metrics['fvu']:.4f} (per prefix {prefixes}) l0={metrics['l0']:.1f} "
              f"dead={metrics['dead_pct_100k']:.1f}% (silent for {DEAD_SHARE_TOKENS:,} tokens; "
              f"{metrics['dead_pct']:.1f}% in the AuxK window of {cfg.dead_after_tokens:,}) "
              f"tokens/s={metrics['tokens_per_s']:,.0f}")
        if set_dir is None:
            print(f"run_dir: {cfg.run_dir}")
            if run.mirror_dir is not None:
                print(f"mirror_dir: {run.mirror_dir}")
    if set_dir is not None:
        print(f"run_dir: {set_dir}")
        if set_mirror is not None:
            print(f"mirror_dir: {set_mirror}")
    failed = [run.cfg.run_name for run in runs() if diverged(run)]
    if failed:
        print(f"error: {', '.join(failed)} diverged (FVU above {DIVERGING_FVU:g}, worse than predicting the mean, "
              "and not improving at the end); the weights and checkpoints are kept, but retrain with a lower lr "
              "or a longer warmup", file=sys.stderr)
        return 1
    return 0
