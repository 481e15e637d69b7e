"""A cross-layer transcoder in circuit-tracer's CLT files, and back.

circuit-tracer 0.5.0's `load_clt` (circuit_tracer/transcoder/cross_layer_transcoder.py) counts the layers by the
`W_enc_*.safetensors` files of a folder and reads, per layer i:

| file | tensors |
| --- | --- |
| `W_enc_{i}.safetensors` | `W_enc_{i}` `[d_transcoder, d_model]` (features as rows), `b_enc_{i}` `[d_transcoder]`, `b_dec_{i}` `[d_model]` (added to layer i's output), `threshold_{i}` `[d_transcoder]` |
| `W_dec_{i}.safetensors` | `W_dec_{i}` `[d_transcoder, n_layers - i, d_model]`: slot j writes to layer i + j |

It encodes `pre * (pre > threshold)` with `pre = x @ W_enc.T + b_enc` and reconstructs layer l as the sum over
i <= l of the features of layer i times `W_dec_{i}[:, l - i]`, plus `b_dec_{l}`: mtc's CLT maths exactly. It
reads no skip connection. Its cache and hub loaders find the hooks in `config.yaml` (`model_kind:
cross_layer_transcoder`, `feature_input_hook`, `feature_output_hook`, `scan`), which is written too. mtc's
config travels in `W_enc_0.safetensors`' header, so a folder reads back as the model it came from.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .checkpoint import atomic_save_tensors, atomic_write_bytes
from .clt import CrossLayerTranscoder
from .config import TranscoderConfig

CONFIG = "config.yaml"
MODEL_KIND = "cross_layer_transcoder"


def relative_hook(template: str) -> str:
    """circuit-tracer's name of a hook template: `blocks.{layer}.ln2.hook_normalized` -> `ln2.hook_normalized`."""
    if not template.startswith("blocks.{layer}."):
        raise ValueError(f"circuit-tracer names hooks relative to blocks.<layer>; {template!r} is not")
    return template.removeprefix("blocks.{layer}.")


def export_circuit_tracer_clt(model: CrossLayerTranscoder, folder: str | Path, scan: str | None = None) -> Path:
    """Write `model` (raw units, e.g. from `final/`) as circuit-tracer's CLT files and `config.yaml` into `folder`."""
    import yaml

    cfg = model.cfg
    if cfg.clt_layers != list(range(len(cfg.clt_layers))):
        raise ValueError(f"circuit-tracer's CLT spans layers 0..N-1; this one spans {cfg.clt_layers}. Train it with "
                         f"--layers all")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(model.n_layers):
        encoder = {f"W_enc_{i}": model.W_enc[i].T, f"b_enc_{i}": model.b_enc[i], f"b_dec_{i}": model.b_dec[i],
                   f"threshold_{i}": model.threshold[i]}
        header = {"format": "pt", **({"mtc_config": cfg.to_json()} if i == 0 else {})}
        atomic_save_tensors({name: t.detach().float().cpu() for name, t in encoder.items()},
                            folder / f"W_enc_{i}.safetensors", header)
        atomic_save_tensors({f"W_dec_{i}": model.W_dec[i].detach().float().cpu()}, folder / f"W_dec_{i}.safetensors",
                            {"format": "pt"})
    settings = {"model_kind": MODEL_KIND, "model_name": cfg.model_name, "scan": scan or f"mtc/{cfg.run_name}",
                "feature_input_hook": relative_hook(cfg.source_hook),
                "feature_output_hook": relative_hook(cfg.target_hook)}
    atomic_write_bytes(folder / CONFIG, yaml.safe_dump(settings, sort_keys=False).encode())
    return folder


def is_clt_export(folder: str | Path) -> bool:
    return (Path(folder) / "W_enc_0.safetensors").is_file()


def load_circuit_tracer_clt(folder: str | Path, device: torch.device | str | None = None) -> CrossLayerTranscoder:
    """A CLT folder in circuit-tracer's layout (ours or another tool's) as a `CrossLayerTranscoder`."""
    import yaml

    folder = Path(folder)
    layers = sorted(int(found.group(1)) for p in folder.glob("W_enc_*.safetensors")
                    if (found := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name)))
    if not layers or layers != list(range(len(layers))):
        raise FileNotFoundError(f"{folder} holds W_enc files for layers {layers}; a CLT needs W_enc_0 .. W_enc_<N-1>")
    settings = yaml.safe_load((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else {}
    with safe_open(str(folder / "W_enc_0.safetensors"), framework="pt") as f:
        header = f.metadata() or {}
    encoders = [load_file(str(folder / f"W_enc_{i}.safetensors")) for i in layers]
    d_sae, d_model = encoders[0]["W_enc_0"].shape
    if "mtc_config" in header:
        cfg = TranscoderConfig.from_json(header["mtc_config"])
    else:
        source = "blocks.{layer}." + settings.get("feature_input_hook", "ln2.hook_normalized")
        target = "blocks.{layer}." + settings.get("feature_output_hook", "hook_mlp_out")
        cfg = TranscoderConfig(model_name=settings.get("model_name", "unknown"), source_hook=source, target_hook=target,
                               d_in=d_model, d_out=d_model, d_sae=d_sae, k=min(64, d_sae), clt_layers=layers,
                               samples_every=0, total_tokens=TranscoderConfig.batch_size, warmup_steps=0)
    model = CrossLayerTranscoder(cfg, device=device)
    state = {"b_dec": torch.stack([found[f"b_dec_{i}"] for i, found in enumerate(encoders)])}
    for i, found in enumerate(encoders):
        state[f"W_enc.{i}"] = found[f"W_enc_{i}"].T
        state[f"b_enc.{i}"] = found[f"b_enc_{i}"]
        state[f"W_dec.{i}"] = load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
    thresholds = [found.get(f"threshold_{i}", torch.zeros(d_sae)).reshape(d_sae) for i, found in enumerate(encoders)]
    state["threshold"] = torch.stack(thresholds).float()
    model.load_state_dict({name: t.to(model.b_dec.dtype) if name != "threshold" else t for name, t in state.items()})
    return model

