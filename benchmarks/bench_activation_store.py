"""Throughput of the activation store against the bare language-model forward it is built on.

Both run on the same contexts in the same process: (a) the model's forward up to the deepest hook
(`stop_at_layer`, no logits, no caching), (b) `ActivationStore` serving batches (forward with the two
hooks cached, BOS dropped, shuffled buffer). Tokens/s counts language-model input tokens.

    python benchmarks/bench_activation_store.py                       # offline Gemma-3-270M, layer 6
    python benchmarks/bench_activation_store.py --model /path/to/hf_folder --layer 1 --contexts 64
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from mtc import TranscoderConfig
from mtc.activations import build_store
from mtc.data import load_documents, pack_contexts
from mtc.language_model import OFFLINE_MODEL, default_hooks, fit_config_to_model, load_language_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=OFFLINE_MODEL)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--contexts", type=int, default=128, help="contexts per measurement")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    bridge = load_language_model(args.model, device=args.device)
    source, target = default_hooks(args.layer)
    tokens_per_fill = args.contexts * (args.seq_len - 1)
    cfg = fit_config_to_model(TranscoderConfig(
        model_name=args.model, source_hook=source, target_hook=target, d_sae=1024, k=32, seq_len=args.seq_len,
        model_batch_size=args.model_batch, buffer_tokens=tokens_per_fill, batch_size=1024,
        total_tokens=10 * tokens_per_fill, warmup_steps=0, dataset="pydoc"), bridge)
    store = build_store(bridge, [cfg], buffer_device=args.device)
    batches_per_fill = tokens_per_fill // cfg.batch_size
    contexts = torch.stack(list(itertools.islice(
        pack_contexts(load_documents(cfg.dataset), bridge.tokenizer, args.seq_len), args.contexts)))

    def bare_forward() -> None:
        with torch.no_grad():
            for start in range(0, len(contexts), args.model_batch):
                bridge(contexts[start:start + args.model_batch].to(args.device), stop_at_layer=store.stop_at_layer)

    def store_fill() -> None:
        for _ in range(batches_per_fill):
            store.next_batch()

    store.next_batch()  # warm-up: first fill, tokenizer, corpus
    bare_forward()
    bare_s, store_s = [], []
    for _ in range(args.rounds):  # alternate, so both see the same machine state
        start = time.perf_counter()
        bare_forward()
        bare_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        store_fill()  # exactly one refill and all its batches
        store_s.append(time.perf_counter() - start)
    n_tokens = args.contexts * args.seq_len
    bare_tps, store_tps = n_tokens / min(bare_s), n_tokens / min(store_s)
    print(f"model={args.model} layer={args.layer} hooks={source} -> {target} d_model={cfg.d_in} "
          f"device={args.device} threads={torch.get_num_threads()} contexts={args.contexts}x{args.seq_len}")
    print(f"bare forward (stop_at_layer={store.stop_at_layer}) : {bare_tps:9.0f} tokens/s")
    print(f"ActivationStore                 : {store_tps:9.0f} tokens/s")
    print(f"ratio store / bare forward      : {store_tps / bare_tps:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
