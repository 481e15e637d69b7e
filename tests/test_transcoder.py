import pytest
import torch

from mtc import MatryoshkaTranscoder, TranscoderConfig
from mtc.transcoder import batch_topk, decode_prefixes


def make(**changes):
    base = dict(d_in=16, d_out=12, d_sae=64, prefix_sizes=[8, 24, 64], k=4, k_aux=8, batch_size=32,
                total_tokens=3200, warmup_steps=0)
    base.update(changes)
    return MatryoshkaTranscoder(TranscoderConfig(**base))


def randomise(model):
    """Give every parameter non-trivial values so tests do not pass on zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        model.normalize_decoder()
    return model


def reference_fvu(y, y_hat):
    y, y_hat = y.double(), y_hat.double()
    return ((y - y_hat) ** 2).sum() / ((y - y.mean(0, keepdim=True)) ** 2).sum()


def test_batch_topk_keeps_exactly_k_times_batch_largest():
    pre = torch.rand(32, 64) + 0.01
    z, smallest = batch_topk(pre, k=5)
    kept = z != 0
    assert int(kept.sum()) == 5 * 32
    assert torch.equal(z[kept], pre[kept])
    assert pre[kept].min() >= pre[~kept].max()
    assert smallest == pre[kept].min()
    assert (kept.sum(1) != 5).any(), "BatchTopK should let tokens differ in count (else it is per-token TopK)"


def test_prefix_reconstructions_equal_decoding_first_latents_only():
    model = randomise(make())
    z = torch.relu(torch.randn(10, 64))
    y_hats = decode_prefixes(z, model.W_dec, model.b_dec, model.cfg.prefix_sizes)
    for g, m in enumerate(model.cfg.prefix_sizes):
        expected = z[:, :m].double() @ model.W_dec[:m].double() + model.b_dec.double()
        torch.testing.assert_close(y_hats[g].double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(z, prefix=g + 1).double(), expected, rtol=1e-5, atol=1e-5)
        # latents beyond the prefix have no influence
        z_changed = z.clone()
        z_changed[:, m:] = 100.0
        torch.testing.assert_close(model.decode(z_changed, prefix=g + 1), model.decode(z, prefix=g + 1))


def test_loss_is_the_weighted_mean_of_independently_computed_prefix_fvus():
    model = randomise(make())
    x, y = torch.randn(32, 16), torch.randn(32, 12)
    out = model.training_forward(x, y)

    pre = torch.relu(x.double() @ model.W_enc.double() + model.b_enc.double())
    cutoff = pre.flatten().sort(descending=True).values[4 * 32 - 1]
    z = torch.where(pre >= cutoff, pre, 0.0)
    fvus = torch.stack([reference_fvu(y, z[:, :m] @ model.W_dec[:m].double() + model.b_dec.double())
                        for m in model.cfg.prefix_sizes])
    torch.testing.assert_close(out.fvu_per_prefix.double(), fvus, rtol=1e-4, atol=1e-5)
    assert float(out.aux_loss) == 0.0  # nothing is dead yet
    weights = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)  # the default: 1 per inner prefix, 3 for the full model
    torch.testing.assert_close(out.loss.double(), (fvus * weights).sum() / weights.sum(), rtol=1e-4, atol=1e-5)
    equal = randomise(make(prefix_weights=[1.0, 1.0, 1.0]))
    equal.load_state_dict(model.state_dict())
    torch.testing.assert_close(equal.training_forward(x, y).loss.double(), fvus.mean(), rtol=1e-4, atol=1e-5)
    metrics = out.metrics()
    assert metrics["fvu"] == pytest.approx(float(fvus[-1].detach()), rel=1e-4)
    assert metrics["fvu_max"] == pytest.approx(float(fvus.max().detach()), rel=1e-4)
    assert metrics["l0"] == pytest.approx(4.0)
    assert {"fvu/prefix_1", "fvu/prefix_2", "fvu/prefix_3", "fvu_min", "fvu_mean", "aux_loss", "dead_pct"} <= set(metrics)


@pytest.mark.parametrize("g", [1, 2, 3])
def test_every_prefix_term_sends_gradient_to_the_first_group(g):
    weights = [0.0, 0.0, 0.0]
    weights[g - 1] = 1.0
    model = randomise(make(prefix_weights=weights))
    x, y = torch.randn(32, 16), torch.randn(32, 12)
    model.training_forward(x, y).loss.backward()
    first_group_grad = model.W_dec.grad[:8].abs().sum(1)
    assert (first_group_grad > 0).any(), f"prefix {g}'s loss term does not reach group 1"
    m = model.cfg.prefix_sizes[g - 1]
    assert model.W_dec.grad[m:].abs().sum() == 0, f"prefix {g} must not use latents beyond {m}"


def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        out = model.training_forward(torch.randn(32, 16), torch.randn(32, 12))
        opt.zero_grad()
        out.loss.backward()
        model.remove_parallel_decoder_grad()
        parallel = (model.W_dec.grad * model.W_dec).sum(1)
        assert parallel.abs().max() < 1e-6
        opt.step()
        model.normalize_decoder()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(64))


def test_threshold_converges_on_stationary_input_and_gives_about_k_at_inference():
    model = randomise(make(threshold_momentum=0.95))
    model.threshold.fill_(0.0)
    smallest_kept = []
    with torch.no_grad():
        for _ in range(300):
            x = torch.randn(256, 16)
            pre = model.pre_activations(x)
            smallest_kept.append(float(batch_topk(pre, 4)[1]))
            model.training_forward(x, torch.randn(256, 12))
    target = torch.tensor(smallest_kept[-100:]).mean()
    assert abs(float(model.threshold) - float(target)) < 0.05 * float(target)
    model.eval()
    l0 = (model.encode(torch.randn(4096, 16)) > 0).sum(-1).float().mean()
    assert 3.0 < float(l0) < 5.0


def test_inference_is_per_token():
    model = randomise(make())
    model.threshold.fill_(0.3)
    x = torch.randn(20, 16)
    together = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(20)])
    torch.testing.assert_close(together, alone)
    # and a token's code is the same whatever batch it sits in
    torch.testing.assert_close(model.encode(x)[3], model.encode(torch.cat([x[3:4], torch.randn(7, 16)]))[0])


def test_jumprelu_zeroes_activations_below_threshold():
    model = randomise(make())
    model.threshold.fill_(0.5)
    x = torch.randn(50, 16)
    a, z = model.pre_activations(x), model.encode(x)
    assert torch.equal(z, torch.where(a > 0.5, a, 0.0))
    assert model.encode(x, prefix=1).shape == (50, 8)


def test_sequence_inputs_and_skip_connection():
    model = randomise(make(skip_connection=True))
    x = torch.randn(3, 5, 16)
    y_hat = model(x)
    assert y_hat.shape == (3, 5, 12)
    torch.testing.assert_close(y_hat.reshape(15, 12), model(x.reshape(15, 16)))
    expected = model.decode(model.encode(x)) + x @ model.W_skip
    torch.testing.assert_close(y_hat, expected)
    out = model.training_forward(x, torch.randn(3, 5, 12))
    out.loss.backward()
    assert model.W_skip.grad.abs().sum() > 0


def test_aux_loss_revives_dead_latents():
    model = randomise(make(dead_after_tokens=10))
    x, y = torch.randn(32, 16), torch.randn(32, 12)
    model.tokens_since_fired[40:] = 1000  # latents 40.. are dead
    out = model.training_forward(x, y)
    assert int(out.n_dead) == 24 and float(out.aux_loss) > 0
    out.loss.backward()
    assert model.W_enc.grad[:, 40:].abs().sum() > 0


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_aux_loss_reaches_dead_latents_whose_pre_activations_are_all_negative(kernels):
    """A latent dies by going negative on every token; AuxK's gradient goes straight through the ReLU to it."""
    model = randomise(make(dead_after_tokens=10, kernels=kernels))
    x, y = torch.randn(32, 16), torch.randn(32, 12)
    with torch.no_grad():
        model.b_enc[40:] = -100.0  # latents 40.. never fire: all pre-activations negative
    model.tokens_since_fired[40:] = 1000
    out = model.training_forward(x, y)
    assert int(out.n_dead) == 24 and float(out.aux_loss) > 0
    out.loss.backward()
    assert (model.b_enc.grad[40:] != 0).all(), "every dead latent picked by AuxK must learn"


def test_firing_counters_count_tokens_since_last_fire():
    model = randomise(make())
    x, y = torch.randn(32, 16), torch.randn(32, 12)
    z_fired = model.training_forward(x, y)  # noqa: F841
    pre = model.pre_activations(x)
    fired = batch_topk(pre, 4)[0].gt(0).any(0)
    assert torch.equal(model.tokens_since_fired == 0, fired)
    assert (model.tokens_since_fired[~fired] == 32).all()


@pytest.mark.parametrize("x, match", [
    (torch.randn(4, 15), r"x must have shape \[batch, 16\]"),
    (torch.randn(16), r"x must have shape"),
    (torch.randn(4, 16, dtype=torch.float64), "dtype"),
    ([[0.0] * 16], "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()(x)


def test_mismatched_batches_and_prefixes():
    model = make()
    with pytest.raises(ValueError, match="same tokens"):
        model.training_forward(torch.randn(4, 16), torch.randn(5, 12))
    with pytest.raises(ValueError, match="y must have shape"):
        model.training_forward(torch.randn(4, 16), torch.randn(4, 16))
    with pytest.raises(ValueError, match="prefix must be between 1 and 3"):
        model(torch.randn(4, 16), prefix=4)
    with pytest.raises(ValueError, match="needs the first 24"):
        model.decode(torch.randn(4, 8), prefix=2)


def planted_data(n_features=64, d_in=48, d_out=40, seed=0):
    """y = sparse latents of x: both are linear read-outs of the same sparse, Zipf-frequent features."""
    gen = torch.Generator().manual_seed(seed)
    D_in = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=gen), dim=1)
    D_out = torch.randn(n_features, d_out, generator=gen)
    freq = 0.3 / torch.arange(1, n_features + 1).float() ** 0.5

    def sample(batch):
        active = torch.rand(batch, n_features, generator=gen) < freq
        s = active * (torch.rand(batch, n_features, generator=gen) + 0.5)
        return s @ D_in, s @ D_out

    return sample


def test_learns_planted_sparse_structure():
    sample = planted_data()
    cfg = TranscoderConfig(d_in=48, d_out=40, d_sae=128, prefix_sizes=[16, 64, 128], k=8, k_aux=16,
                           dead_after_tokens=20_000, batch_size=512, total_tokens=512 * 1500, lr=3e-3,
                           warmup_steps=0)
    model = MatryoshkaTranscoder(cfg)
    model.init_from_batch(*sample(4096))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.total_steps):
        out = model.training_forward(*sample(cfg.batch_size))
        opt.zero_grad()
        out.loss.backward()
        model.remove_parallel_decoder_grad()
        opt.step()
        model.normalize_decoder()
    assert out.metrics()["fvu"] < 0.1

    model.eval()
    x, y = sample(4096)
    with torch.no_grad():
        held_out = [float(reference_fvu(y, model(x, prefix=g))) for g in (1, 2, 3)]
    assert held_out[-1] < 0.1, held_out
    assert held_out[0] > held_out[1] > held_out[2], "coarse-to-fine: longer prefixes must reconstruct better"


def test_bias_init_centres_pre_activations_so_latents_are_not_born_dead():
    """Activations with a large shared mean direction, as in language models."""
    model = make(d_sae=256, prefix_sizes=[], k=4)
    offset = torch.randn(16) * 10
    x, y = torch.randn(512, 16) + offset, torch.randn(512, 12) + 3
    fired_before = batch_topk(model.pre_activations(x), 4)[0].gt(0).any(0).sum()
    model.init_from_batch(x, y)
    pre = x @ model.W_enc + model.b_enc
    torch.testing.assert_close(pre.mean(0), torch.zeros(256), atol=1e-4, rtol=0)
    torch.testing.assert_close(pre.std(0), torch.ones(256), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.b_dec, y.mean(0))
    fired_after = batch_topk(model.pre_activations(x), 4)[0].gt(0).any(0).sum()
    assert fired_after > 2 * fired_before and fired_after > 0.5 * 256


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_and_dense_kernels_give_the_same_loss_and_gradients(skip):
    x, y = torch.randn(64, 16), torch.randn(64, 12)
    results = {}
    for kernels in ("dense", "sparse"):
        torch.manual_seed(3)
        model = randomise(make(kernels=kernels, skip_connection=skip, dead_after_tokens=10))
        model.tokens_since_fired[50:] = 100  # some dead latents, so AuxK is in the loss too
        out = model.training_forward(x, y)
        out.loss.backward()
        results[kernels] = (out.loss.detach(), out.fvu_per_prefix,
                            {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_d, fvu_d, grads_d), (loss_s, fvu_s, grads_s) = results["dense"], results["sparse"]
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fvu_s, fvu_d, rtol=1e-5, atol=1e-6)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sparse_decode_matches_dense_decode_on_a_batch_with_empty_tokens():
    from mtc.kernels import decode_prefixes_sparse

    model = randomise(make())
    z = torch.relu(torch.randn(10, 64)) * (torch.rand(10, 64) < 0.1)
    z[3] = 0.0  # a token with no active latent
    tokens, latents = z.nonzero(as_tuple=True)
    sparse = decode_prefixes_sparse(tokens, latents, z[tokens, latents], 10, model.W_dec, model.b_dec, [8, 24, 64])
    torch.testing.assert_close(sparse,
                               decode_prefixes(z, model.W_dec, model.b_dec, [8, 24, 64]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["random", "few_positive", "one_hot_columns"])
def test_top_entries_finds_exactly_the_topk_set(case):
    """The sampled pre-filter (used on CPU for large batches) must return the same entries as topk,
    including when the sample misjudges the threshold and the plain topk has to run."""
    from mtc.kernels import top_entries

    torch.manual_seed(0)
    pre = torch.relu(torch.randn(512, 2048))
    if case == "few_positive":  # fewer positive entries than n_keep: ties at zero
        pre = torch.relu(torch.randn(512, 2048) - 3.5)
    if case == "one_hot_columns":  # all the mass in columns the strided sample never visits
        pre = torch.zeros(512, 2048)
        pre[:, 5::31] = torch.rand(512, len(range(5, 2048, 31))) + 1.0
    flat = pre.flatten()
    n_keep = 16 * 512
    got = top_entries(flat, n_keep)
    want = flat.topk(n_keep).indices
    assert len(got) == n_keep and len(set(got.tolist())) == n_keep
    torch.testing.assert_close(flat[got].sort().values, flat[want].sort().values, rtol=0, atol=0)
    if case == "random":  # no ties: the very same entries
        assert set(got.tolist()) == set(want.tolist())


def test_sparse_kernels_match_dense_at_a_size_that_uses_the_fast_selection():
    """Loss, per-prefix FVU, every gradient, L0, threshold and firing counters agree between the sparse
    kernels and the dense autograd reference, at a batch large enough for the CPU selection pre-filter,
    with AuxK active and the skip path on. (In bfloat16 the two may break ties at the selection
    boundary differently, so exact agreement is checked in float32.)"""
    torch.manual_seed(0)
    x, y = torch.randn(512, 48), torch.randn(512, 40)
    results = {}
    for kernels in ("dense", "sparse"):
        torch.manual_seed(1)
        model = make(d_in=48, d_out=40, d_sae=2048, prefix_sizes=[256, 768, 2048], k=16, k_aux=64,
                     batch_size=512, total_tokens=5120, kernels=kernels, dead_after_tokens=1000,
                     skip_connection=True)
        randomise(model)
        model.tokens_since_fired[1500:] = 5000  # dead latents: AuxK contributes
        out = model.training_forward(x, y)
        out.loss.backward()
        results[kernels] = (out, model)
    (dense, dense_model), (sparse, sparse_model) = results["dense"], results["sparse"]
    assert float(sparse.aux_loss) > 0
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.fvu_per_prefix, dense.fvu_per_prefix, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.l0, dense.l0)
    torch.testing.assert_close(sparse.dense_latents(), dense.dense_latents())
    torch.testing.assert_close(sparse_model.threshold, dense_model.threshold)
    assert torch.equal(sparse_model.tokens_since_fired, dense_model.tokens_since_fired)
    for (name, p_sparse), p_dense in zip(sparse_model.named_parameters(), dense_model.parameters()):
        torch.testing.assert_close(p_sparse.grad, p_dense.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_bfloat16_compute_stays_close_to_float32(kernels):
    torch.manual_seed(0)
    x, y = torch.randn(256, 16), torch.randn(256, 12)
    losses = {}
    for compute_dtype in ("float32", "bfloat16"):
        torch.manual_seed(2)
        model = randomise(make(compute_dtype=compute_dtype, kernels=kernels, skip_connection=True))
        out = model.training_forward(x, y)
        out.loss.backward()
        losses[compute_dtype] = float(out.loss.detach())
        assert model.W_enc.grad.dtype == torch.float32 and torch.isfinite(model.W_enc.grad).all()
        assert model.W_enc.dtype == torch.float32  # parameters stay float32
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)


def test_blocked_transpose_is_a_transpose():
    from mtc.kernels import transposed

    t = torch.randn(130, 7)  # not a multiple of the block
    assert torch.equal(transposed(t), t.T) and transposed(t).is_contiguous()


def test_calibrated_threshold_gives_exactly_k_active_latents_per_token_on_its_tokens():
    model = randomise(make(k=5))
    batches = [torch.randn(32, 16) for _ in range(6)]
    threshold = model.calibrate_threshold(batches)
    assert threshold > 0 and float(model.threshold) == threshold
    active = sum(int((model.encode(x) > 0).sum()) for x in batches)
    assert active == 5 * 32 * 6
    model.threshold.fill_(threshold * 0.9)
    assert sum(int((model.encode(x) > 0).sum()) for x in batches) > active, "the threshold must be the binding one"
