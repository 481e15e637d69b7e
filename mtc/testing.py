"""Test fakes: tiny random language models built offline, and a synthetic activation store.

`tiny_model(folder, arch)` writes a small `transformers` model (Gemma-2, Gemma-3 or GPT-2 architecture)
and the byte-level BPE tokenizer of `mtc.random_model.tiny_tokenizer` into `folder`, with no network
access. The folder loads like any Hugging Face model folder, so every code path (hook resolution, the
activation store, training) is exercised exactly as with a real model.

Only tests import this module; no module of the package does (tests/test_structure.py checks it).
"""

from __future__ import annotations

import json
from pathlib import Path

from .random_model import tiny_tokenizer  # noqa: F401  (tests import it from here too)

TINY_ARCHS = ("gemma2", "gemma3", "gpt2")


def tiny_model(folder: str | Path, arch: str = "gemma2", n_layers: int = 3, d_model: int = 64,
               seed: int = 0) -> Path:
    """Write a random `arch` model with `n_layers` layers of width `d_model`, and its tokenizer, to
    `folder`; returns the folder. Norm weights are perturbed so that normalisation hooks differ from
    their inputs."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    gemma = dict(hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=d_model // 4,
                 max_position_embeddings=512, sliding_window=64, query_pre_attn_scalar=d_model // 4, **ids)
    torch.manual_seed(seed)
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**gemma))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**gemma))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=512,
                                           n_inner=4 * d_model, **ids))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name or ".ln_" in name):
                param.add_(torch.randn_like(param) * 0.3)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 names its generic fast tokenizer `TokenizersBackend`, which transformers 4 (circuit-tracer's
    # venv) does not know; both read the same tokenizer.json as `PreTrainedTokenizerFast`.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder


class SyntheticStore:
    """Serves planted sparse structure like an `ActivationStore`, without a language model: x and y are
    linear read-outs of the same sparse, Zipf-frequent features. Batch `i` depends only on (seed, i), so
    the state is one counter and resumption is exact."""

    def __init__(self, d_in: int, d_out: int, batch_size: int, n_features: int = 64, n_pairs: int = 1,
                 seed: int = 0):
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.features_in = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=gen), dim=1)
        self.features_out = torch.randn(n_features, d_out, generator=gen)
        self.frequency = 0.3 / torch.arange(1, n_features + 1).float() ** 0.5
        self.batch_size, self.n_pairs, self.seed = batch_size, n_pairs, seed
        self.batches_served = 0

    def next_batch(self):
        import torch

        from .activations import ActivationBatch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches_served)
        self.batches_served += 1
        active = torch.rand(self.batch_size, len(self.frequency), generator=gen) < self.frequency
        codes = active * (torch.rand(active.shape, generator=gen) + 0.5)
        x, y = codes @ self.features_in, codes @ self.features_out
        zeros = torch.zeros(self.batch_size, dtype=torch.long)
        return ActivationBatch(sources=[x] * self.n_pairs, targets=[y] * self.n_pairs, context_ids=zeros,
                               positions=zeros)

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = state["batches_served"]
