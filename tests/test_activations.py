import itertools

import pytest
import torch

from mtc import TranscoderConfig
from mtc.activations import ActivationStore, build_store
from mtc.data import load_documents, pack_contexts, split_documents

PAIR = ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
CROSS = ("blocks.0.hook_resid_post", "blocks.2.hook_mlp_out")


def config(**changes):
    base = dict(source_hook=PAIR[0], target_hook=PAIR[1], d_in=64, d_out=64, d_sae=128, k=4, batch_size=64,
                total_tokens=64 * 100, warmup_steps=0, seq_len=24, buffer_tokens=400, model_batch_size=4,
                dataset="pydoc")
    base.update(changes)
    return TranscoderConfig(**base)


def contexts_by_id(bridge, cfg, n):
    stream = pack_contexts(split_documents(load_documents(cfg.dataset), "train"), bridge.tokenizer, cfg.seq_len)
    return torch.stack(list(itertools.islice(stream, n)))


def test_pairs_equal_run_with_cache_at_the_same_positions_and_skip_bos(gemma2_bridge):
    cfg = config()
    store = build_store(gemma2_bridge, [cfg, config(source_hook=CROSS[0], target_hook=CROSS[1])])
    batches = [store.next_batch() for _ in range(8)]  # spans two buffer fills
    assert store.fill_index == 1
    contexts = contexts_by_id(gemma2_bridge, cfg, int(max(b.context_ids.max() for b in batches)) + 1)
    with torch.no_grad():
        _, cache = gemma2_bridge.run_with_cache(contexts)  # full forward, no stop, for reference
    bos = gemma2_bridge.tokenizer.bos_token_id
    for batch in batches:
        ids, pos = batch.context_ids, batch.positions
        assert (contexts[ids, pos] != bos).all() and (pos > 0).all()
        for (src, tgt), x, y in zip([PAIR, CROSS], batch.sources, batch.targets):
            assert torch.equal(x, cache[src][ids, pos])
            assert torch.equal(y, cache[tgt][ids, pos])


def test_batches_mix_many_contexts(gemma2_bridge):
    batch = build_store(gemma2_bridge, [config()]).next_batch()
    assert batch.context_ids.unique().numel() >= 10


def test_two_pairs_from_one_pass_match_two_separate_stores(gemma2_bridge):
    joint = build_store(gemma2_bridge, [config(), config(source_hook=CROSS[0], target_hook=CROSS[1])])
    alone = build_store(gemma2_bridge, [config(source_hook=CROSS[0], target_hook=CROSS[1])])
    for _ in range(3):
        a, b = joint.next_batch(), alone.next_batch()
        assert torch.equal(a.sources[1], b.sources[0]) and torch.equal(a.targets[1], b.targets[0])
        assert torch.equal(a.context_ids, b.context_ids)


def test_forward_stops_after_the_deepest_hook(gemma2_bridge):
    calls = {}
    handles = [block.original_component.register_forward_pre_hook(
        lambda *_, i=i: calls.__setitem__(i, calls.get(i, 0) + 1)) for i, block in enumerate(gemma2_bridge.blocks)]
    handles.append(gemma2_bridge.unembed.original_component.register_forward_pre_hook(
        lambda *_: calls.__setitem__("lm_head", 1)))
    try:
        store = build_store(gemma2_bridge, [config()])  # deepest hook is in block 1 of 3
        assert store.stop_at_layer == 2
        store.next_batch()
    finally:
        for h in handles:
            h.remove()
    assert calls.get(0, 0) > 0 and calls.get(1, 0) > 0
    assert 2 not in calls and "lm_head" not in calls


def test_forward_for_the_last_layer_stops_before_the_logits(gemma2_bridge):
    """stop_at_layer stops before a block; for hooks in the last block the store must stop the pass itself
    (the unembedding of a 256k vocabulary costs more than the blocks of a small model)."""
    last = ("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")
    called = []
    handle = gemma2_bridge.unembed.original_component.register_forward_pre_hook(lambda *_: called.append(1))
    try:
        store = build_store(gemma2_bridge, [config(source_hook=last[0], target_hook=last[1])])
        batch = store.next_batch()
    finally:
        handle.remove()
    assert not called
    contexts = contexts_by_id(gemma2_bridge, config(), int(batch.context_ids.max()) + 1)
    with torch.no_grad():
        _, cache = gemma2_bridge.run_with_cache(contexts)
    assert torch.equal(batch.targets[0], cache[last[1]][batch.context_ids, batch.positions])
    assert gemma2_bridge(contexts[:1]).shape[-1] == gemma2_bridge.cfg.d_vocab  # later passes still reach the logits


def test_saved_state_gives_identical_next_batches(gemma2_bridge):
    store = build_store(gemma2_bridge, [config()])
    for _ in range(5):
        store.next_batch()
    state = store.state_dict()
    expected = [store.next_batch() for _ in range(9)]  # crosses a refill
    resumed = build_store(gemma2_bridge, [config()])
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got.sources[0], want.sources[0]) and torch.equal(got.targets[0], want.targets[0])
        assert torch.equal(got.context_ids, want.context_ids) and torch.equal(got.positions, want.positions)


def test_different_seeds_shuffle_differently(gemma2_bridge):
    a = build_store(gemma2_bridge, [config(seed=0)]).next_batch()
    b = build_store(gemma2_bridge, [config(seed=1)]).next_batch()
    assert not torch.equal(a.positions, b.positions)


def test_buffer_dtype_is_configurable(gemma2_bridge):
    batch = build_store(gemma2_bridge, [config(activation_dtype="bfloat16")]).next_batch()
    assert batch.sources[0].dtype == torch.bfloat16


def test_bad_hooks_and_small_data_raise_before_training(gemma2_bridge, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        build_store(gemma2_bridge, [config(target_hook="blocks.9.hook_mlp_out")])
    with pytest.raises(ValueError, match="must share batch_size"):
        build_store(gemma2_bridge, [config(), config(batch_size=32)])
    (tmp_path / "tiny.txt").write_text("only a few words here")
    store = build_store(gemma2_bridge, [config(dataset=str(tmp_path / "tiny.txt"))])
    with pytest.raises(RuntimeError, match="exhausted"):
        store.next_batch()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_store(gemma2_bridge, [config(dataset=str(tmp_path / "missing.jsonl"))])


def test_store_takes_any_context_source(gemma2_bridge):
    contexts = [torch.tensor([2] + list(range(10, 30))) for _ in range(30)]
    store = ActivationStore(gemma2_bridge, lambda: iter(contexts), [PAIR], batch_size=32, buffer_tokens=100,
                            model_batch_size=8, exclude_token_ids=[2])
    batch = store.next_batch()
    assert batch.sources[0].shape == (32, 64) and (batch.positions > 0).all()


def test_float16_overflow_falls_back_to_float32(tiny_dirs):
    from mtc.language_model import load_language_model

    bridge = load_language_model(str(tiny_dirs["gemma2"]), dtype="float16")
    with torch.no_grad():
        bridge.original_model.model.embed_tokens.weight.fill_(1e4)  # x sqrt(d_model)=8 overflows float16 (max 65504)
    store = build_store(bridge, [config()])
    with pytest.warns(UserWarning, match="overflowed in float16"):
        batch = store.next_batch()
    assert next(bridge.parameters()).dtype == torch.float32
    assert torch.isfinite(batch.sources[0]).all() and torch.isfinite(batch.targets[0]).all()


def served(store, n):
    return [store.next_batch() for _ in range(n)]


def same_batches(a, b):
    return all(torch.equal(x.sources[0], y.sources[0]) and torch.equal(x.targets[0], y.targets[0])
               and torch.equal(x.context_ids, y.context_ids) for x, y in zip(a, b, strict=True))


def test_background_prefetch_serves_the_same_batches(gemma2_bridge):
    plain = build_store(gemma2_bridge, [config()])
    prefetching = build_store(gemma2_bridge, [config(prefetch=True)])
    assert same_batches(served(plain, 20), served(prefetching, 20))  # several fills
    assert prefetching._pending is not None  # the next fill is being computed while this one is served


def test_last_fill_is_sized_to_the_batches_the_run_still_needs(gemma2_bridge):
    cfg = config(total_tokens=64 * 8, buffer_tokens=64 * 6)  # 8 steps: one full fill (6 batches), then 2
    store = build_store(gemma2_bridge, [cfg.replace(prefetch=True)])
    batches = served(store, 8)
    assert store.fill_index == 1
    assert store._fill.n_batches == 2 and store._pending is None  # right-sized, and nothing computed after it
    contexts_per_full_fill = store.contexts_before_fill
    assert store._fill.n_contexts < contexts_per_full_fill / 2
    unlimited = build_store(gemma2_bridge, [config(buffer_tokens=64 * 6, total_tokens=64 * 100)])
    assert same_batches(batches[:6], served(unlimited, 6))  # full fills are unchanged


def test_resume_with_prefetch_is_exact(gemma2_bridge):
    store = build_store(gemma2_bridge, [config(prefetch=True)])
    served(store, 5)
    state = store.state_dict()
    expected = served(store, 9)  # crosses a refill
    resumed = build_store(gemma2_bridge, [config(prefetch=True)])
    served(resumed, 2)  # a store that had moved on (and started prefetching) is rewound
    resumed.load_state_dict(state)
    assert same_batches(expected, served(resumed, 9))


def test_the_store_reports_each_forward_pass_tokens_to_its_progress(gemma2_bridge):
    store = build_store(gemma2_bridge, [config()])
    reported = []
    store.progress = reported.append
    store.next_batch()
    assert len(reported) == store._fill.n_contexts // 4 + (store._fill.n_contexts % 4 > 0)  # one per forward pass
    assert sum(reported) == len(store._fill.order)  # every kept token of the fill, BOS excluded
