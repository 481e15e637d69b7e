import pytest
import torch

from mtc import MatryoshkaTranscoder, TranscoderConfig
from mtc.activations import build_store
from mtc.samples import ARRAYS_FILE, INDEX_FILE, SampleCollector, collect_samples, context_lookup, load_samples

D_SAE, SEQ_LEN, N_CONTEXTS = 24, 12, 30


def random_batches(n_batches=5, tokens=40, seed=0):
    """Sparse non-negative latents with their (context id, position), no (id, position) repeated."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randperm(N_CONTEXTS * SEQ_LEN, generator=gen)[: n_batches * tokens]
    batches = []
    for chunk in cells.split(tokens):
        latents = torch.rand(len(chunk), D_SAE, generator=gen) * (torch.rand(len(chunk), D_SAE, generator=gen) < 0.2)
        batches.append((latents, chunk // SEQ_LEN, chunk % SEQ_LEN))
    return batches


def fed(batches, collector=None, generator=None):
    collector = collector or SampleCollector(D_SAE, top_n=5, n_random=3)
    for latents, ids, pos in batches:
        collector.update(latents, ids, pos, generator=generator)
    return collector


def test_top_n_and_frequency_equal_a_brute_force_reference():
    batches = random_batches()
    collector = fed(batches)
    latents, ids, pos = (torch.cat(parts) for parts in zip(*batches))
    values, rows = latents.T.topk(5, dim=1)
    assert torch.equal(collector.top_values, values)
    active = values > 0
    assert torch.equal(collector.top_context_ids[active], ids[rows][active])
    assert torch.equal(collector.top_positions[active], pos[rows][active])
    assert (collector.top_context_ids[~active] == -1).all()
    assert torch.equal(collector.frequency_counts, (latents > 0).sum(0))
    assert collector.tokens_seen == len(latents)


def test_random_examples_are_active_entries_and_depend_on_the_seed():
    batches = random_batches()
    latents, ids, pos = (torch.cat(parts) for parts in zip(*batches))
    dense = torch.full((N_CONTEXTS, SEQ_LEN, D_SAE), -1.0)
    dense[ids, pos] = latents
    draws = [fed(batches, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for c in draws:
        kept = c.random_context_ids >= 0
        n_active = (latents > 0).sum(0)
        assert torch.equal(kept.sum(1), n_active.clamp_max(3))  # as many as there are, up to n_random
        latent_index = torch.arange(D_SAE).unsqueeze(1).expand_as(kept)
        recorded = dense[c.random_context_ids[kept], c.random_positions[kept], latent_index[kept]]
        assert (recorded > 0).all()
        assert torch.equal(recorded, c.random_values[kept])
    assert not torch.equal(draws[0].random_context_ids, draws[1].random_context_ids)


def test_state_dict_round_trip_continues_identically():
    batches = random_batches(n_batches=6)
    original = fed(batches[:3])
    state = original.state_dict()
    resumed = SampleCollector(D_SAE, top_n=5, n_random=3, seed=99)
    resumed.load_state_dict(state)
    fed(batches[3:], original)
    fed(batches[3:], resumed)
    for name in SampleCollector._TENSORS:
        assert torch.equal(getattr(original, name), getattr(resumed, name)), name
    assert original.tokens_seen == resumed.tokens_seen
    with pytest.raises(ValueError, match="top_n"):
        SampleCollector(D_SAE, top_n=4, n_random=3).load_state_dict(state)


def test_save_load_round_trip_with_windows_padded_at_context_edges(tmp_path):
    contexts = torch.randint(4, 500, (N_CONTEXTS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    collector = fed(random_batches())
    collector.save(tmp_path / "samples", lambda ids: contexts[ids], window=(3, 2), meta={"model_name": "tiny"})
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == sorted([INDEX_FILE, ARRAYS_FILE])

    samples = load_samples(tmp_path)  # a run dir holding samples/
    assert (samples.d_sae, samples.top_n, samples.n_random, samples.window) == (D_SAE, 5, 3, (3, 2))
    assert samples.meta == {"model_name": "tiny"} and samples.tokens_seen == collector.tokens_seen
    assert torch.equal(samples.top_values, collector.top_values)
    assert torch.allclose(samples.frequency, collector.frequency_counts.double() / collector.tokens_seen)
    assert samples.top_tokens.shape == (D_SAE, 5, 6) and samples.top_tokens.dtype == torch.int32
    for kind in ("top", "random"):
        ids, pos = getattr(samples, f"{kind}_context_ids"), getattr(samples, f"{kind}_positions")
        tokens = getattr(samples, f"{kind}_tokens")
        for i, j in (ids >= 0).nonzero().tolist():
            expected = [int(contexts[ids[i, j], p]) if 0 <= p < SEQ_LEN else -1
                        for p in range(int(pos[i, j]) - 3, int(pos[i, j]) + 3)]
            assert tokens[i, j].tolist() == expected
        assert (tokens[ids < 0] == -1).all()
    edge = (samples.top_positions == 0) | (samples.top_positions == SEQ_LEN - 1)
    assert edge.any() and (samples.top_tokens[edge] == -1).any(-1).all()

    latent = samples.latent(int(samples.most_frequent(1)[0]))
    for ex in latent["top"]:
        assert ex["tokens"][ex["peak"]] == int(contexts[ex["context_id"], ex["position"]])
    assert [ex["value"] for ex in latent["top"]] == sorted((ex["value"] for ex in latent["top"]), reverse=True)
    counts = samples.frequency_counts
    assert all(counts[a] >= counts[b] for a, b in zip(samples.most_frequent(5), samples.most_frequent(5)[1:]))


def test_load_samples_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_samples(tmp_path)


# ---------------------------------------------------------------------- end to end on a tiny Gemma-2
PAIR = ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")


@pytest.fixture(scope="module")
def collected(gemma2_bridge, tmp_path_factory):
    torch.manual_seed(0)
    cfg = TranscoderConfig(source_hook=PAIR[0], target_hook=PAIR[1], d_in=64, d_out=64, d_sae=48,
                           prefix_sizes=[8, 24, 48], k=4, batch_size=64, total_tokens=64 * 10, warmup_steps=0,
                           seq_len=24, buffer_tokens=400, model_batch_size=4, model_name="tiny-gemma2",
                           dataset="pydoc")
    model = MatryoshkaTranscoder(cfg).eval()
    model.threshold.fill_(0.5)
    store = build_store(gemma2_bridge, [cfg])
    collector = collect_samples(model, store, n_batches=8, top_n=6, n_random=3)
    folder = tmp_path_factory.mktemp("run") / "samples"
    collector.save(folder, context_lookup(store.make_contexts), meta={"model_name": cfg.model_name,
                                                                       "hooks": list(PAIR)})
    return model, store, collector, load_samples(folder)


def test_recorded_peak_activation_equals_the_model_recomputed_from_the_stored_context(gemma2_bridge, collected):
    model, store, _, samples = collected
    lookup = context_lookup(store.make_contexts)
    checked = 0
    for i in samples.most_frequent(3) + [samples.d_sae - 1]:
        for ex in samples.latent(i)["top"][:3]:
            context = lookup(torch.tensor([ex["context_id"]]))
            assert ex["tokens"][ex["peak"]] == int(context[0, ex["position"]])
            with torch.no_grad():
                _, cache = gemma2_bridge.run_with_cache(context, names_filter=[PAIR[0]])
                latents = model.encode(cache[PAIR[0]][0, ex["position"]].unsqueeze(0))
            torch.testing.assert_close(latents[0, i].item(), ex["value"], rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 6


def test_collected_frequency_matches_the_tokens_seen(collected):
    _, _, collector, samples = collected
    assert samples.tokens_seen == 8 * 64
    assert 0 < float(samples.frequency.mean()) < 1
    assert samples.meta["hooks"] == list(PAIR)


def test_format_latent_marks_the_peak_token_and_shows_the_frequency(gemma2_bridge, collected):
    _, _, _, samples = collected
    tokenizer = gemma2_bridge.tokenizer
    i = samples.most_frequent(1)[0]
    info = samples.latent(i)
    text = samples.format_latent(i, tokenizer, n=4)
    top_lines = text.splitlines()[2:6]
    for ex, line in zip(info["top"], top_lines):
        peak = tokenizer.decode([ex["tokens"][ex["peak"]]])
        peak = peak.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
        assert f"«{peak}»" in line and f"{ex['value']:.4f}" in line
    assert f"{info['frequency']:.4%}" in text and "random:" in text

    report = samples.group_report(tokenizer, [8, 24, 48], per_group=2, most_frequent=3)
    assert "group 3: latents [24, 48)" in report
    assert report.count("latent 24:") == 1 + samples.most_frequent(3).count(24)
