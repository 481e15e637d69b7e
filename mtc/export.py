"""`python -m mtc export FORMAT --run RUN [--prefix g] --out DIR`: a trained run or set, whole or cut to a
Matryoshka prefix, in the files another tool reads.

| format | a single run | a set (`--layers`) |
| --- | --- | --- |
| `circuit-tracer` | refused unless it is every layer | `config.yaml` + `layer_<L>.safetensors` for every layer |
| `gemma-scope` | `DIR/params.npz` | `DIR/layer_<L>/params.npz` |
| `saelens` | `DIR/cfg.json` + `sae_weights.safetensors` | `DIR/layer_<L>/...` |

A cross-layer transcoder (`train --clt`) exports to circuit-tracer only, as its CLT files (`mtc/clt_interop.py`).

`--prefix g` writes only the first `prefix_sizes[g-1]` latents of every transcoder: prefix g alone is a
complete transcoder (that is what the Matryoshka loss trains), so a set cut at prefix 1 gives a
coarse attribution graph and the full set a fine one. The folder is written under a temporary name and
renamed into place, so an interrupted export never leaves a mixed folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .checkpoint import CONFIG_FILE, load, model_folder, remove_checkpoint
from .clt import CrossLayerTranscoder
from .clt_interop import export_circuit_tracer_clt
from .config import TranscoderConfig
from .gemma_scope import GEMMA_SCOPE_FILE, export_gemma_scope
from .interop import CIRCUIT_TRACER_CONFIG, SAELENS_CONFIG, export_circuit_tracer, export_saelens
from .language_model import hook_layer
from .sets import TranscoderSet, is_set, load_set
from .transcoder import MatryoshkaTranscoder

FORMATS = ("circuit-tracer", "gemma-scope", "saelens")
EXPORT_MARKERS = (CIRCUIT_TRACER_CONFIG, GEMMA_SCOPE_FILE, SAELENS_CONFIG)


def trained_models(run: str | Path) -> tuple[dict[int, MatryoshkaTranscoder], str]:
    """({layer: transcoder}, name) of a set folder, or of a single run dir / model folder (keyed by the
    layer of its source hook)."""
    run = Path(run)
    if is_set(run):
        return load_set(run), TranscoderSet.load(run).config.run_name
    folder, run_dir = model_folder(run)
    if folder.name != "final":
        print(f"note: {run_dir} has no final/; exporting {folder}", file=sys.stderr)
    model = load(folder)
    return {hook_layer(model.cfg.source_hook): model}, run_dir.name


def cross_layer_transcoder(run: str | Path) -> CrossLayerTranscoder | None:
    """The CLT a run dir or model folder holds (None for a set or a transcoder)."""
    if is_set(run):
        return None
    folder, _ = model_folder(run)
    return load(folder) if TranscoderConfig.load(folder / CONFIG_FILE).clt_layers else None


def cut_to_prefix(models: dict[int, MatryoshkaTranscoder], prefix: int | None) -> dict[int, MatryoshkaTranscoder]:
    if prefix is None:
        return models
    groups = min(model.cfg.n_prefixes for model in models.values())
    if not 1 <= prefix <= groups:
        raise ValueError(f"--prefix {prefix}: these transcoders have {groups} prefix group(s); choose 1..{groups} "
                         f"(prefix g keeps the first prefix_sizes[g-1] latents)")
    return {layer: model.prefix_model(prefix) for layer, model in models.items()}


def check_every_layer(models: dict[int, MatryoshkaTranscoder]) -> None:
    """circuit-tracer builds its replacement model from a transcoder for every layer 0..N-1 and rejects gaps."""
    from .memory import model_shape

    layers = sorted(models)
    model_name = next(iter(models.values())).cfg.model_name
    try:
        n_layers = model_shape(model_name).n_layers
    except Exception:  # a hub model without network: check for gaps only
        n_layers = layers[-1] + 1
    missing = sorted(set(range(n_layers)) - set(layers))
    if missing:
        raise ValueError(f"circuit-tracer needs a transcoder for every layer 0..{n_layers - 1} of {model_name}; "
                         f"layer(s) {missing} are missing. Train a set with `python -m mtc train --layers all`, or "
                         f"use --format saelens / gemma-scope for single layers")


def export(fmt: str, run: str | Path, out: str | Path, prefix: int | None = None) -> Path:
    """Write `run` (a set or a single run) in format `fmt` to folder `out`; returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not any((out / marker).exists() for marker in EXPORT_MARKERS) \
            and not any(out.glob("layer_*")):
        raise ValueError(f"--out {out} is a folder that holds something other than an export; choose an empty or "
                         f"new folder")
    clt = cross_layer_transcoder(run)
    if clt is not None and fmt != "circuit-tracer":
        raise ValueError(f"{run} is a cross-layer transcoder: it exports to circuit-tracer only ({fmt} files hold "
                         f"single-layer transcoders)")
    models, name = ({}, Path(run).name) if clt is not None else trained_models(run)
    models = cut_to_prefix(models, prefix) if models else models
    per_layer = is_set(run)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if clt is not None:
            check_every_layer(dict.fromkeys(clt.cfg.clt_layers, clt))
            model = cut_to_prefix({0: clt}, prefix)[0]
            export_circuit_tracer_clt(model, tmp, scan=f"mtc/{name}" + (f"/prefix_{prefix}" if prefix else ""))
        elif fmt == "circuit-tracer":
            check_every_layer(models)
            scan = f"mtc/{name}" + (f"/prefix_{prefix}" if prefix else "")
            for layer, model in sorted(models.items()):
                export_circuit_tracer(model, tmp, layer=layer, scan=scan)
        else:
            write = export_gemma_scope if fmt == "gemma-scope" else export_saelens
            for layer, model in sorted(models.items()):
                write(model, tmp / f"layer_{layer}" if per_layer else tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        remove_checkpoint(out)
    tmp.rename(out)
    return out
