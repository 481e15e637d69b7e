"""Named starting points for common runs. A preset is a set of `TranscoderConfig` fields; `d_in` and
`d_out` always come from the model (`mtc.launch` reads them from its config.json), and a `d_sae` of None means "8 x the model width"."""

from __future__ import annotations

from .language_model import GEMMA_2_2B, OFFLINE_MODEL, default_hooks, hook_name


SIGN_DESCENT_LR_FLOOR = 1.06e-2  # the best rate measured at 8,192 and 16,384 latents


def matryoshka_prefixes(d_sae: int) -> list[int]:
    """Cumulative prefix sizes with groups of 1/16, 1/8, 1/4 and the rest of the latents (for 18,432
    latents: groups 1152/2304/4608/10368)."""
    first = d_sae // 16
    return [first, 3 * first, 7 * first, d_sae]


def sign_descent_lr(d_sae: int) -> float:
    """The learning rate of the recipe (schedule-free sign descent): EleutherAI sparsify's rule
    `5e-3 * sqrt(16384 / d_sae)`, but never below 1.06e-2 (1.26e-2 for the demo's 2,560 latents, 1.06e-2 from 3,646
    latents on, the Gemma-2 presets included). Activations are normalised, so it carries across models. On the
    offline model the rule's rate was too low at 8,192 and 16,384 latents, in 700 steps and in 4,000 (the Gemma-2
    presets' step count): 1.06e-2 gave a lower FVU and fewer dead latents at both widths (docs/training.md)."""
    return round(max(5e-3 * (2**14 / d_sae) ** 0.5, SIGN_DESCENT_LR_FLOOR), 6)


def aux_window(d_sae: int, k: int) -> int:
    """`16 * d_sae / k` tokens: AuxK trains every latent that stayed silent while an average latent (firing on
    k / d_sae of the tokens) would have fired 16 times; 1,280 tokens for the demo (docs/training.md)."""
    return 16 * d_sae // k


def recipe(d_sae: int, k: int) -> dict:
    """The training recipe chosen on the FVU-dead frontier (docs/training.md): schedule-free sign descent at
    `sign_descent_lr`, AuxK on latents silent for `aux_window` tokens."""
    return dict(optimizer="signsgd", lr=sign_descent_lr(d_sae), dead_after_tokens=aux_window(d_sae, k))


def _gemma2(layer: int, d_sae: int, steps: int, **extra) -> dict:
    source, target = default_hooks(layer)
    return dict(model_name=GEMMA_2_2B, source_hook=source, target_hook=target, d_sae=d_sae,
                prefix_sizes=matryoshka_prefixes(d_sae), k=96, batch_size=4096, total_tokens=steps * 4096,
                warmup_steps=min(200, steps // 10), seq_len=128, model_batch_size=32,
                buffer_tokens=262_144, dataset="HuggingFaceFW/fineweb-edu", run_name=f"gemma2-2b-l{layer}",
                **recipe(d_sae, 96), **extra)


PRESETS: dict[str, dict] = {
    # quick look at a middle layer: 1,000 steps, about 4M tokens
    "gemma2-2b-l8": _gemma2(8, 18_432, 1_000, log_every=25, checkpoint_every=250),
    "gemma2-2b-l12": _gemma2(12, 36_864, 4_000),
    # the reference run: 18,432 latents, k=96, about 16M tokens, groups 1152/2304/4608/10368
    "gemma2-2b-l17": _gemma2(17, 18_432, 4_000),
    # offline Gemma-3-270M on a laptop CPU, a few minutes
    # The MLP's literal input (`mlp_in`, norm gain applied) rather than `ln2.hook_normalized`: Gemma-3's
    # gains span 0..27, and on this short budget the gained input reaches a clearly lower FVU.
    # model_dtype "auto": the forward that feeds training runs about twice as fast in bfloat16 on CPUs that
    # compute it natively (docs/performance.md), and stays float32 elsewhere.
    "demo": dict(model_name=OFFLINE_MODEL, source_hook=hook_name("mlp_in", 6), target_hook=default_hooks(6)[1],
                 model_dtype="auto",
                 d_sae=2560, prefix_sizes=matryoshka_prefixes(2560), k=32, k_aux=256, batch_size=512,
                 total_tokens=512 * 700, warmup_steps=25, seq_len=128, model_batch_size=16, buffer_tokens=131_072,
                 dataset="pydoc", run_name="demo", log_every=25, checkpoint_every=100, **recipe(2560, 32)),
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
    """Sensible settings for any layer of any model: 8x expansion, k = 64, Matryoshka groups, the recipe at the
    default batch size; a web corpus for hub models (the offline corpus holds only about half a million tokens)."""
    source, target = default_hooks(layer)
    d_sae = 8 * d_model
    dataset = "pydoc" if model_name == OFFLINE_MODEL else "HuggingFaceFW/fineweb-edu"
    return dict(source_hook=source, target_hook=target, d_sae=d_sae, prefix_sizes=matryoshka_prefixes(d_sae),
                k=64, run_name=f"layer{layer}", dataset=dataset,
                **recipe(d_sae, 64))
