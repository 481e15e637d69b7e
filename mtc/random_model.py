"""Language models with random weights, built offline: what `python -m mtc bench --random-weights` measures.

The cost of a forward pass does not depend on the weights, so a hub model's architecture (its config.json
fields in `language_model.HUB_MODELS`) or a local folder's config is built with random weights and no
download. The tokenizer is `tiny_tokenizer`, a small byte-level BPE trained on a few sentences, so token ids
stay below 512 whatever the architecture's vocabulary; the tiny test models of `mtc.testing` use it too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .language_model import HUB_MODELS, OFFLINE_MODEL, resolve_model_dtype, resolve_model_path

_TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog while a transcoder reads the residual stream",
    "def f(x): return x * 2  # a function in Python with a comment and some numbers 0123456789",
    "Sparse latents reconstruct the MLP output; every prefix of the Matryoshka must do it alone.",
]


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3) that adds
    BOS like Gemma's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TOKENIZER_TEXT * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def random_language_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """A `TransformerBridge` with `name`'s architecture and random weights, for throughput benchmarks.
    `name` is a model of `HUB_MODELS` or a local folder / the offline model (its config.json is used)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import torch_dtype

    dtype = resolve_model_dtype(dtype, device)
    tokenizer = tiny_tokenizer()
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if name in HUB_MODELS:
        shape = dict(HUB_MODELS[name])
        config = AutoConfig.for_model(shape.pop("model_type"), **shape, **special)
    elif name == OFFLINE_MODEL or Path(name).expanduser().is_dir():
        config = AutoConfig.from_pretrained(resolve_model_path(name), **special)
    else:
        raise ValueError(f"no known architecture for {name!r}; random weights work for {', '.join(HUB_MODELS)}, "
                         f"{OFFLINE_MODEL!r} and local model folders")
    from transformer_lens.model_bridge import TransformerBridge

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype)).eval()
    with tempfile.TemporaryDirectory(prefix="mtc-random-") as folder:
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=model, device=device,
                                                     dtype=torch_dtype(dtype))
    return bridge.eval()
