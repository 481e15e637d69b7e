"""Named starting points for common runs. A preset is a set of `TranscoderConfig` fields; `d_in` and
`d_out` always come from the model (`mtc.launch` reads them from its config.json), and a `d_sae` of None means "8 x the model width"."""

from __future__ import annotations

from .language_model import GEMMA_2_2B, OFFLINE_MODEL, default_hooks, hook_name


def matryoshka_prefixes(d_sae: int) -> list[int]:
    """Cumulative prefix sizes with groups of 1/16, 1/8, 1/4 and the rest of the latents (for 18,432
    latents: groups 1152/2304/4608/10368)."""
    first = d_sae // 16
    return [first, 3 * first, 7 * first, d_sae]


DEMO_LR, DEMO_D_SAE = 1.25e-3, 2560  # chosen by the ablations in docs/training.md


def width_scaled_lr(d_sae: int) -> float:
    """The demo's learning rate scaled by 1/sqrt(width), the usual rule for sparse dictionaries (sparsify and
    OpenAI's TopK autoencoders use it too); activations are normalised, so it carries across models."""
    return round(DEMO_LR * (DEMO_D_SAE / d_sae) ** 0.5, 6)


def _gemma2(layer: int, d_sae: int, steps: int, **extra) -> dict:
    source, target = default_hooks(layer)
    lr = width_scaled_lr(d_sae)
    return dict(model_name=GEMMA_2_2B, source_hook=source, target_hook=target, d_sae=d_sae,
                prefix_sizes=matryoshka_prefixes(d_sae), k=96, batch_size=4096, total_tokens=steps * 4096,
                warmup_steps=min(200, steps // 10), lr=lr, min_lr=lr / 10, seq_len=128, model_batch_size=32,
                buffer_tokens=262_144, dataset="HuggingFaceFW/fineweb-edu", run_name=f"gemma2-2b-l{layer}",
                dead_after_tokens=5_000_000, **extra)


PRESETS: dict[str, dict] = {
    # quick look at a middle layer: 1,000 steps, about 4M tokens
    "gemma2-2b-l8": _gemma2(8, 18_432, 1_000, log_every=25, checkpoint_every=250),
    "gemma2-2b-l12": _gemma2(12, 36_864, 4_000),
    # the reference run: 18,432 latents, k=96, about 16M tokens, groups 1152/2304/4608/10368
    "gemma2-2b-l17": _gemma2(17, 18_432, 4_000),
    # offline Gemma-3-270M on a laptop CPU, a few minutes
    # The MLP's literal input (`mlp_in`, norm gain applied) rather than `ln2.hook_normalized`: Gemma-3's
    # gains span 0..27, and on this short budget the gained input reaches a clearly lower FVU.
    "demo": dict(model_name=OFFLINE_MODEL, source_hook=hook_name("mlp_in", 6), target_hook=default_hooks(6)[1],
                 d_sae=2560, prefix_sizes=matryoshka_prefixes(2560), k=32, k_aux=256, batch_size=512,
                 total_tokens=512 * 700, warmup_steps=25, lr=DEMO_LR, min_lr=DEMO_LR / 10, seq_len=128,
                 model_batch_size=16, buffer_tokens=131_072, dataset="pydoc", run_name="demo", dead_after_tokens=100_000,
                 log_every=25, checkpoint_every=100),
}

LAYER_PRESETS = {8: "gemma2-2b-l8", 12: "gemma2-2b-l12", 17: "gemma2-2b-l17"}


def preset_for(preset: str | None, layer: int | None, model_name: str | None) -> str | None:
    """The preset a launch means: the one named, else the Gemma-2-2B preset of `layer` when the model is
    Gemma-2-2B (or unspecified), else none."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return preset
    if layer in LAYER_PRESETS and model_name in (None, GEMMA_2_2B):
        return LAYER_PRESETS[layer]
    return None


def defaults_for_layer(layer: int, d_model: int, model_name: str) -> dict:
    """Sensible settings for any layer of any model: 8x expansion, k = 64, Matryoshka groups; a web corpus
    for hub models (the offline corpus holds only about half a million tokens)."""
    source, target = default_hooks(layer)
    d_sae = 8 * d_model
    dataset = "pydoc" if model_name == OFFLINE_MODEL else "HuggingFaceFW/fineweb-edu"
    return dict(source_hook=source, target_hook=target, d_sae=d_sae, prefix_sizes=matryoshka_prefixes(d_sae),
                k=64, run_name=f"layer{layer}", dataset=dataset)
