"""Google's Gemma Scope transcoders: read them (both generations) to compare with mtc's, and write mtc's in the
first generation's format.

| generation | file | layout |
| --- | --- | --- |
| Gemma Scope (Gemma-2) | `params.npz` | `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`, `b_enc`, `b_dec`, `threshold [d_sae]` |
| Gemma Scope 2 (Gemma-3) | `params.safetensors` + `config.json` | `w_enc [d_in, d_sae]`, `w_dec [d_sae, d_out]`, `b_enc`, `b_dec`, `threshold [d_sae]`, optional `affine_skip_connection [d_in, d_out]` (added as `x @ affine_skip_connection`); `config.json` names the hooks as Hugging Face module outputs (`hf_hook_point_in`, `hf_hook_point_out`) and gives `l0`, `model_name` |

Both are JumpReLU transcoders, `z = pre * (pre > threshold)`, and load as a `JumpReLUTranscoder`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .jumprelu import JumpReLUTranscoder, build_jumprelu, foreign_config, per_latent_threshold
from .language_model import GEMMA_2_2B, default_hooks, hook_name
from .transcoder import MatryoshkaTranscoder

GEMMA_SCOPE_FILE = "params.npz"
GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
GEMMA_SCOPE_2_FILE, GEMMA_SCOPE_2_CONFIG = "params.safetensors", "config.json"
GEMMA_SCOPE_2_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
GEMMA_SCOPE_EXAMPLE = "google/gemma-scope-2b-pt-transcoders/layer_17/width_16k/average_l0_XX/params.npz"
GEMMA_SCOPE_2_EXAMPLE = "google/gemma-scope-2-270m-pt/transcoder_all/layer_6_width_16k_l0_small/params.safetensors"
# Hugging Face module outputs of a Gemma-3 decoder layer -> mtc's site names (docs: mtc/language_model.py)
HF_POINTS = {"pre_feedforward_layernorm.output": "mlp_in", "post_feedforward_layernorm.output": "mlp_out",
             "output": "resid_post"}


def _layer_of(source: str | Path, layer: int | None) -> int:
    """`L` from a `layer_<L>` path component (`layer_17/` or `layer_6_width_16k...`), else `layer`."""
    found = re.search(r"(?:^|/)layer_(\d+)(?:[/_]|$)", str(source).replace(os.sep, "/"))
    if found is None and layer is None:
        raise ValueError(f"no layer_<L> component in {source}; pass layer=L so the hooks can be named")
    return int(found.group(1)) if found else layer


# ---------------------------------------------------------------------- Gemma Scope (params.npz)
def export_gemma_scope(model: MatryoshkaTranscoder, path: str | Path) -> Path:
    """Write a Gemma Scope `params.npz` (JumpReLU transcoder): `W_enc [d_in, d_sae]`,
    `W_dec [d_sae, d_out]`, `b_enc`, `b_dec` and `threshold` as a per-latent array.

    The prefix structure needs no extra data: prefix g is the first `prefix_sizes[g-1]` latents.
    """
    if model.W_skip is not None:
        raise ValueError("the Gemma Scope format has no skip path (W_skip); train with "
                         "skip_connection=False or save with mtc.save instead")
    path = Path(path)
    if path.suffix != ".npz":
        path = path / "params.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(model, name).detach().float().cpu().numpy()
              for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    arrays["threshold"] = per_latent_threshold(model).float().numpy()
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _gemma_scope_file(source: str | Path) -> Path:
    """A local file, or `<org>/<repo>/<path in repo>` downloaded from the Hugging Face Hub."""
    if Path(source).is_file():
        return Path(source)
    parts = str(source).strip("/").split("/")
    if Path(source).is_absolute() or len(parts) < 3:
        raise FileNotFoundError(f"{source} is not a file; pass a local params.npz / params.safetensors or a hub path "
                                f"like {GEMMA_SCOPE_EXAMPLE} or {GEMMA_SCOPE_2_EXAMPLE}")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as err:
        raise RuntimeError(
            f"{source} is not a local file, and downloading {filename} from the Hugging Face Hub repo "
            f"{repo_id} failed ({type(err).__name__}: {err}). This needs network access (HF_HUB_OFFLINE "
            "unset) and, for gated or private repos, a token in HF_TOKEN; otherwise download the file "
            "elsewhere and pass its local path.") from err


def check_gemma_scope_arrays(arrays: dict[str, np.ndarray], source: str = GEMMA_SCOPE_FILE) -> None:
    """Raise `ValueError` naming the first missing key or wrong shape of a Gemma Scope transcoder."""
    missing = [key for key in GEMMA_SCOPE_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}; a Gemma Scope transcoder has "
                         f"{list(GEMMA_SCOPE_KEYS)}, this file has {sorted(arrays)}")

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{source}: {key} has shape {list(arrays[key].shape)}, expected {expected}")

    if arrays["W_enc"].ndim != 2:
        raise bad("W_enc", "2-D [d_in, d_sae]")
    d_in, d_sae = arrays["W_enc"].shape
    if arrays["W_dec"].ndim != 2 or arrays["W_dec"].shape[0] != d_sae:
        raise bad("W_dec", f"[d_sae, d_out] = [{d_sae}, d_out] (d_sae from W_enc [{d_in}, {d_sae}])")
    d_out = arrays["W_dec"].shape[1]
    expected = {"b_enc": (d_sae,), "b_dec": (d_out,)}
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise bad(key, str(list(shape)))
    if arrays["threshold"].shape not in ((d_sae,), ()):
        raise bad("threshold", f"[{d_sae}] (one per latent) or a scalar")


def _load_gemma_scope_1(path: Path, source: str | Path, device: torch.device | str,
                        layer: int | None) -> JumpReLUTranscoder:
    """A transcoder from a Gemma Scope (Gemma-2) `params.npz`, on the hooks its users feed it.

    Hooks are those the tools that use Gemma Scope transcoders feed them, `blocks.L.ln2.hook_normalized` ->
    `blocks.L.hook_mlp_out` (mtc's default pair too): SAELens 6 (`get_gemma_2_transcoder_config_from_hf`),
    and circuit-tracer, whose nnsight mapping reads `ln2.hook_normalized` at the pre-MLP RMSNorm's
    normalisation, before its gain, as mtc's bridge hook does. So `mtc compare` evaluates a Gemma Scope
    file on the input circuit-tracer gives it. `L` comes from a `layer_<L>` path component, else `layer`.
    """
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    check_gemma_scope_arrays(arrays, source=str(source))
    layer = _layer_of(source, layer)
    l0 = re.search(r"average_l0_(\d+)", str(source))
    d_in, d_sae = arrays["W_enc"].shape
    d_out = arrays["W_dec"].shape[1]
    source_hook, target_hook = default_hooks(layer)
    fields: dict[str, Any] = dict(d_in=d_in, d_out=d_out, d_sae=d_sae, model_name=GEMMA_2_2B,
                                  source_hook=source_hook, target_hook=target_hook)
    if l0 and 1 <= int(l0.group(1)) <= d_sae:
        fields["k"] = int(l0.group(1))
    tensors = {key: torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)) for key in GEMMA_SCOPE_KEYS}
    tensors["threshold"] = tensors["threshold"].expand(d_sae).contiguous()
    return build_jumprelu(foreign_config(None, **fields), tensors, str(source), device)


# ---------------------------------------------------------------------- Gemma Scope 2 (params.safetensors)
def bridge_hook(point: str, source: str) -> str:
    """The bridge hook of a Hugging Face module output, `model.layers.6.pre_feedforward_layernorm.output` ->
    `blocks.6.mlp.hook_in` (the norm's output with its weight applied: what the MLP reads)."""
    found = re.fullmatch(r"model\.(?:language_model\.)?layers\.(\d+)\.(.+)", point)
    if found is None or found.group(2) not in HF_POINTS:
        raise ValueError(f"{source}: hook point {point!r} has no mtc equivalent; known: "
                         f"model.layers.<L>.{{{', '.join(HF_POINTS)}}}")
    return hook_name(HF_POINTS[found.group(2)], int(found.group(1)))


def _load_gemma_scope_2(path: Path, source: str | Path, device: torch.device | str,
                        layer: int | None) -> JumpReLUTranscoder:
    """A Gemma Scope 2 transcoder. Hooks come from the `config.json` beside the weights; without one, the
    MLP pair of the layer named in the path (`mlp_in` -> `mlp_out`)."""
    tensors = load_file(str(path))
    missing = [key for key in GEMMA_SCOPE_2_KEYS if key not in tensors]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}; a Gemma Scope 2 transcoder has "
                         f"{list(GEMMA_SCOPE_2_KEYS)} (+ affine_skip_connection), this file has {sorted(tensors)}")
    check_gemma_scope_arrays({k.replace("w_", "W_"): tensors[k].float().numpy()
                              for k in GEMMA_SCOPE_2_KEYS}, source=str(source))
    config_path = path.with_name(GEMMA_SCOPE_2_CONFIG)
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "hf_hook_point_in" in config and "hf_hook_point_out" in config:
        source_hook = bridge_hook(config["hf_hook_point_in"], str(config_path))
        target_hook = bridge_hook(config["hf_hook_point_out"], str(config_path))
    else:
        at = _layer_of(source, layer)
        source_hook, target_hook = hook_name("mlp_in", at), hook_name("mlp_out", at)
    d_in, d_sae = tensors["w_enc"].shape
    d_out = tensors["w_dec"].shape[1]
    skip = tensors.get("affine_skip_connection")
    if skip is not None and tuple(skip.shape) != (d_in, d_out):
        raise ValueError(f"{source}: affine_skip_connection has shape {list(skip.shape)}, expected [{d_in}, {d_out}]")
    fields: dict[str, Any] = dict(d_in=d_in, d_out=d_out, d_sae=d_sae, source_hook=source_hook, target_hook=target_hook,
                                  skip_connection=skip is not None)
    named = re.search(r"gemma-scope-2-(\d+[mb])", str(source))  # the repo names the model: gemma-scope-2-270m-pt
    if config.get("model_name") or named:
        fields["model_name"] = config.get("model_name") or f"google/gemma-3-{named.group(1)}"
    if isinstance(config.get("l0"), int) and 1 <= config["l0"] <= d_sae:
        fields["k"] = config["l0"]
    ours = {"W_enc": tensors["w_enc"], "W_dec": tensors["w_dec"], "b_enc": tensors["b_enc"], "b_dec": tensors["b_dec"],
            "threshold": tensors["threshold"].float().expand(d_sae).contiguous()}
    if skip is not None:
        ours["W_skip"] = skip
    return build_jumprelu(foreign_config(None, **fields), {k: v.float() for k, v in ours.items()}, str(source), device)


def load_gemma_scope(source: str | Path, device: torch.device | str = "cpu",
                     layer: int | None = None) -> JumpReLUTranscoder:
    """A Gemma Scope transcoder, local or on the Hugging Face Hub:

    - Gemma Scope (Gemma-2), `params.npz`, e.g. `google/gemma-scope-2b-pt-transcoders/layer_<L>/width_16k/
      average_l0_<N>/params.npz`;
    - Gemma Scope 2 (Gemma-3), `params.safetensors` with its `config.json` beside it, e.g.
      `google/gemma-scope-2-270m-pt/transcoder_all/layer_<L>_width_16k_l0_small/params.safetensors`.

    `layer` names the hooks when the path has no `layer_<L>` component (and, for Gemma Scope 2, no config.json)."""
    path = _gemma_scope_file(source)
    if path.suffix == ".safetensors":
        if not Path(source).is_file():  # from the hub: its config.json too
            config = str(source).rsplit("/", 1)[0] + "/" + GEMMA_SCOPE_2_CONFIG
            try:
                _gemma_scope_file(config)
            except RuntimeError:
                pass  # hooks from the path instead
        return _load_gemma_scope_2(path, source, device, layer)
    return _load_gemma_scope_1(path, source, device, layer)
