"""How a launch's settings are layered: preset < `--config` file < flags, and for a set (`--layers`) the one
config its layers share. Every function returns validated `TranscoderConfig`s or raises a `UsageError`
naming the flag, file or field and the fix."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from .config import TranscoderConfig
from .errors import UsageError


def flag_settings(args: argparse.Namespace) -> dict:
    """The `TranscoderConfig` fields given as flags (unset flags are absent from the namespace)."""
    return {f.name: getattr(args, f.name) for f in fields(TranscoderConfig) if hasattr(args, f.name)}


def config_settings(args: argparse.Namespace, d_model: int | None = None) -> list[dict]:
    """The settings of every transcoder to train. Without `d_model` (before the model is loaded) a
    `--layer` that has no preset keeps the config defaults for sizes; with it, sizes follow the width."""
    from .language_model import default_hooks
    from .presets import PRESETS, defaults_for_layer, matryoshka_prefixes, preset_for

    flags = flag_settings(args)
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


def set_config(args: argparse.Namespace):
    """(the shared config of a set, the model's `ModelShape`) for `train --layers`, from the model's config
    file alone. Each layer gets its own default hook pair, so hooks and `--layer` are refused."""
    from .memory import model_shape
    from .presets import defaults_for_layer

    explicit = {**(read_config_file(args.config[0]) if args.config else {}), **flag_settings(args)}
    for name, problem in (("layer", args.layer is not None), ("config", len(args.config) > 1),
                          ("source_hook", "source_hook" in explicit), ("target_hook", "target_hook" in explicit)):
        if problem:
            raise UsageError(f"--{name.replace('_', '-')} cannot be combined with --layers: a set trains each layer's "
                             f"default hook pair (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out) from one config")
    settings = config_settings(args)[0]
    model_name = settings.get("model_name", TranscoderConfig.model_name)
    shape = model_shape(model_name)
    if not args.preset and "d_sae" not in explicit:  # sizes from the model's width, as --layer does
        derived = defaults_for_layer(0, shape.d_model, model_name)
        settings.update({k: v for k, v in derived.items() if k not in ("source_hook", "target_hook", "run_name")
                         and k not in explicit})
    if "run_name" not in explicit:
        settings["run_name"] = f"{settings.get('run_name', TranscoderConfig.run_name)}-set"
    config = make_configs([settings], [f"--config {args.config[0]}" if args.config else ""])[0]
    return config.replace(d_in=shape.d_model, d_out=shape.d_model), shape
