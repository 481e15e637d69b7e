"""Exports to, and imports from, the formats other interpretability tools read.

| format | files | layout |
| --- | --- | --- |
| Gemma Scope (`mtc/gemma_scope.py`) | `params.npz` | `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`, `b_enc`, `b_dec`, `threshold [d_sae]` |
| SAELens (v6) | `cfg.json`, `sae_weights.safetensors` | as Gemma Scope; `W_skip [d_out, d_in]`, used as `x @ W_skip.T` |
| circuit-tracer | `config.yaml`, `layer_<L>.safetensors` | `W_enc [d_sae, d_model]` (transposed), `W_dec [d_sae, d_model]`, `b_enc`, `b_dec`, `activation_function.threshold [d_sae]`, `W_skip [d_model, d_model]` used as `x @ W_skip.T` |

All three apply JumpReLU with a per-latent threshold, `z = pre * (pre > threshold)`; our scalar
threshold is written as a constant array. Foreign files load as `JumpReLUTranscoder`, a
`MatryoshkaTranscoder` whose `threshold` buffer is `[d_sae]`.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, atomic_save_tensors, atomic_write_bytes, load
from .config import TranscoderConfig
from .jumprelu import JumpReLUTranscoder, build_jumprelu, detached_cpu, foreign_config, per_latent_threshold
from .transcoder import MatryoshkaTranscoder

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
CIRCUIT_TRACER_CONFIG = "config.yaml"


# ---------------------------------------------------------------------- SAELens
def export_saelens(model: MatryoshkaTranscoder, folder: str | Path) -> Path:
    """Write a SAELens v6 `jumprelu_transcoder` (`jumprelu_skip_transcoder` with a skip path): `cfg.json`
    and `sae_weights.safetensors`. Hooks and model name go to `metadata`, as do `prefix_sizes` and our
    whole config (`mtc_config`), so the nesting survives a round trip."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = {name: detached_cpu(getattr(model, name)) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    tensors["threshold"] = per_latent_threshold(model)
    if model.W_skip is not None:
        tensors["W_skip"] = detached_cpu(model.W_skip.T)  # SAELens: [d_out, d_in]
    config = {
        "architecture": "jumprelu_skip_transcoder" if model.W_skip is not None else "jumprelu_transcoder",
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "d_out": cfg.d_out, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            # Without a version >= 6, SAELens converts the config as pre-6 and drops unknown metadata.
            "sae_lens_version": "6.0.0", "sae_lens_training_version": None,
            "model_name": cfg.model_name, "hook_name": cfg.source_hook, "hook_name_out": cfg.target_hook,
            "hook_head_index": None, "prepend_bos": True, "context_size": cfg.seq_len,
            "dataset_path": cfg.dataset, "prefix_sizes": cfg.prefix_sizes, "mtc_config": cfg.to_dict(),
            **saelens_training_metadata(cfg),
        },
    }
    atomic_save_tensors(tensors, folder / SAELENS_WEIGHTS, {"format": "pt"})
    atomic_write_bytes(folder / SAELENS_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return folder


def saelens_training_metadata(cfg: TranscoderConfig) -> dict[str, Any]:
    """How SAELens (6.5x) records the training of a saved SAE in its metadata: `training_architecture` (the
    training config's architecture) and `training_architecture_details` (its fields the inference
    architecture lacks). A Matryoshka transcoder trained as SAELens's `matryoshka_batchtopk` would, with its
    cumulative widths as `matryoshka_widths`; a plain one as `batchtopk`."""
    details: dict[str, Any] = {"k": cfg.k, "aux_loss_coefficient": cfg.aux_coeff}
    if cfg.n_prefixes > 1:
        details["matryoshka_widths"] = list(cfg.prefix_sizes)
    return {"training_architecture": "matryoshka_batchtopk" if cfg.n_prefixes > 1 else "batchtopk",
            "training_architecture_details": details}


def _load_saelens(folder: Path, device: torch.device | str | None) -> JumpReLUTranscoder:
    config = json.loads((folder / SAELENS_CONFIG).read_text())
    arch = config.get("architecture")
    if arch not in ("jumprelu_transcoder", "jumprelu_skip_transcoder"):
        raise ValueError(f"{folder}: SAELens architecture {arch!r} is not supported; "
                         "use jumprelu_transcoder or jumprelu_skip_transcoder")
    if config.get("apply_b_dec_to_input") or config.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{folder}: apply_b_dec_to_input / normalize_activations are not supported; "
                         "fold them into the weights first")
    meta = {**config, **config.get("metadata", {})}  # pre-6 configs keep hooks at the top level
    tensors = load_file(str(folder / SAELENS_WEIGHTS))
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    cfg = foreign_config(meta.get("mtc_config"), d_in=config["d_in"], d_out=config["d_out"],
                          d_sae=config["d_sae"], skip_connection="W_skip" in tensors,
                          dtype=config.get("dtype", "float32"), model_name=meta.get("model_name") or "unknown",
                          source_hook=meta["hook_name"], target_hook=meta["hook_name_out"])
    return build_jumprelu(cfg, tensors, str(folder / SAELENS_WEIGHTS), device)


# ---------------------------------------------------------------------- circuit-tracer
def _relative_hook(hook: str, layer: int, name: str) -> str:
    prefix = f"blocks.{layer}."
    if not hook.startswith(prefix):
        raise ValueError(f"circuit-tracer names hooks relative to blocks.<layer>; {name}={hook!r} is not "
                         f"under {prefix} (export with the layer the transcoder was trained on)")
    return hook.removeprefix(prefix)


def export_circuit_tracer(model: MatryoshkaTranscoder, folder: str | Path, layer: int, scan: str | None = None) -> Path:
    """Write `layer_<layer>.safetensors` and `config.yaml` (model_kind `transcoder_set`) for
    circuit-tracer. Export every layer of a set into the same folder: circuit-tracer loads a set only
    when layers 0..N-1 are all present, and all must share the same hooks. Our config travels in the
    safetensors header (`mtc_config`); the file holds only the tensors circuit-tracer loads."""
    import yaml

    cfg = model.cfg
    if cfg.d_in != cfg.d_out:
        raise ValueError(f"circuit-tracer transcoders map d_model to d_model; this one maps d_in={cfg.d_in} "
                         f"to d_out={cfg.d_out}. Use export_saelens instead")
    settings = {"model_kind": "transcoder_set", "model_name": cfg.model_name,
                "feature_input_hook": _relative_hook(cfg.source_hook, layer, "source_hook"),
                "feature_output_hook": _relative_hook(cfg.target_hook, layer, "target_hook")}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / CIRCUIT_TRACER_CONFIG
    existing = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    clashes = [f"{key}: folder has {existing[key]!r}, this model {value!r}"
               for key, value in settings.items() if key in existing and existing[key] != value]
    if clashes:
        raise ValueError(f"{config_path} belongs to a different transcoder set ({'; '.join(clashes)}); "
                         "export into another folder")
    tensors = {"W_enc": detached_cpu(model.W_enc.T), "W_dec": detached_cpu(model.W_dec),
               "b_enc": detached_cpu(model.b_enc), "b_dec": detached_cpu(model.b_dec),
               "activation_function.threshold": per_latent_threshold(model)}
    if model.W_skip is not None:
        tensors["W_skip"] = detached_cpu(model.W_skip.T)  # circuit-tracer computes x @ W_skip.T
    atomic_save_tensors(tensors, folder / f"layer_{layer}.safetensors",
                      {"format": "pt", "mtc_config": cfg.to_json()})
    layers = sorted(int(m.group(1)) for p in folder.glob("layer_*.safetensors")
                    if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name)))
    config = {**existing, **settings, "scan": scan or existing.get("scan", f"mtc/{cfg.run_name}"),
              "transcoders": [f"layer_{i}.safetensors" for i in layers]}
    atomic_write_bytes(config_path, yaml.safe_dump(config, sort_keys=False).encode())
    return folder


def _load_circuit_tracer(folder: Path, layer: int | None, device: torch.device | str | None) -> JumpReLUTranscoder:
    import yaml

    config = yaml.safe_load((folder / CIRCUIT_TRACER_CONFIG).read_text())
    layers = sorted(int(m.group(1)) for p in folder.glob("layer_*.safetensors")
                    if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name)))
    if layer is None and len(layers) != 1:
        raise ValueError(f"{folder} holds layers {layers}; pass layer= to choose one")
    layer = layers[0] if layer is None else layer
    path = folder / f"layer_{layer}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {folder} holds layers {layers}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    tensors = load_file(str(path))
    tensors["W_enc"] = tensors["W_enc"].T.contiguous()
    tensors["threshold"] = tensors.pop("activation_function.threshold")
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    d_sae, d_model = tensors["W_dec"].shape
    mtc_config = json.loads(header["mtc_config"]) if "mtc_config" in header else None
    cfg = foreign_config(mtc_config, d_in=d_model, d_out=d_model, d_sae=d_sae,
                          skip_connection="W_skip" in tensors, model_name=config.get("model_name", "unknown"),
                          source_hook=f"blocks.{layer}.{config['feature_input_hook']}",
                          target_hook=f"blocks.{layer}.{config['feature_output_hook']}")
    return build_jumprelu(cfg, tensors, str(path), device)


# ---------------------------------------------------------------------- any export, W&B
def load_export(path: str | Path, layer: int | None = None,
                device: torch.device | str | None = None) -> MatryoshkaTranscoder:
    """Read back any of our exports, recognised by its files: an `mtc.save` folder, a SAELens folder,
    a circuit-tracer folder (`layer` picks one of several layers) or a Gemma Scope `params.npz`."""
    from .gemma_scope import GEMMA_SCOPE_FILE, load_gemma_scope

    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return load_gemma_scope(path, device=device or "cpu", layer=layer)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a folder nor a .npz file")
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        tensors = load_file(str(path / WEIGHTS_FILE))
        if tensors.get("threshold", torch.zeros(())).ndim == 0:
            return load(path, device=device)
        return build_jumprelu(TranscoderConfig.load(path / CONFIG_FILE), tensors, str(path / WEIGHTS_FILE), device)
    if (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return _load_saelens(path, device)
    if (path / CIRCUIT_TRACER_CONFIG).is_file():
        return _load_circuit_tracer(path, layer, device)
    if (path / GEMMA_SCOPE_FILE).is_file():
        return load_gemma_scope(path / GEMMA_SCOPE_FILE, device=device or "cpu", layer=layer)
    raise FileNotFoundError(
        f"{path} holds no known export ({sorted(p.name for p in path.iterdir())}); expected "
        f"{WEIGHTS_FILE} + {CONFIG_FILE} (mtc), {SAELENS_CONFIG} + {SAELENS_WEIGHTS} (SAELens), "
        f"{CIRCUIT_TRACER_CONFIG} + layer_<L>.safetensors (circuit-tracer) or {GEMMA_SCOPE_FILE}")


def _download_artifact(name: str, root: str) -> str:
    try:
        import wandb

        return wandb.Api().artifact(name).download(root=root)
    except Exception as err:
        raise RuntimeError(
            f"could not fetch W&B artifact {name!r} ({type(err).__name__}: {err}). Check the name "
            "(entity/project/artifact:alias, e.g. me/mtc/run-checkpoint:latest), network access, and "
            "that WANDB_API_KEY is set or `wandb login` was run.") from err


def load_wandb_artifact(name: str, device: torch.device | str = "cpu",
                        root: str | Path | None = None) -> MatryoshkaTranscoder:
    """Download W&B artifact `entity/project/name:alias` (a checkpoint folder logged by the trainer, or
    any export above) and load it. Files go to `root`, else to a temporary folder removed afterwards."""
    if root is not None:
        return load_export(_download_artifact(name, str(root)), device=device)
    with tempfile.TemporaryDirectory(prefix="mtc-wandb-") as tmp:
        return load_export(_download_artifact(name, tmp), device=device)
