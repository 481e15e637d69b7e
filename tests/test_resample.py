import pytest
import torch

from mtc import TranscoderConfig
from mtc.optim import make_optimizer, train_step
from mtc.resample import resample_dead, resampling_due
from mtc.transcoder import MatryoshkaTranscoder


def setup(optimizer: str):
    torch.manual_seed(0)
    cfg = TranscoderConfig(d_in=24, d_out=20, d_sae=64, prefix_sizes=[16, 64], k=4, k_aux=8, batch_size=64,
                           total_tokens=64 * 20, warmup_steps=2, lr=1e-2, min_lr=1e-3, dead_after_tokens=100,
                           optimizer=optimizer, resample_every=5)
    model = MatryoshkaTranscoder(cfg)
    optimizer = make_optimizer(model, cfg)
    x, y = torch.randn(64, 24), torch.randn(64, 20)
    model.init_from_batch(x, y)
    for _ in range(2):
        train_step(model, optimizer, x, y, lr=1e-2)
    return model, optimizer, x, y


@pytest.mark.parametrize("name", ["adam", "signsgd"])
def test_dead_latents_restart_on_high_error_tokens_with_fresh_optimiser_state(name):
    model, optimizer, x, y = setup(name)
    dead = torch.tensor([3, 17, 40])
    model.tokens_since_fired.zero_()
    model.tokens_since_fired[dead] = 100
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    residual = y - model(x)
    assert resample_dead(model, optimizer, x, y) == 3
    live = torch.ones(64, dtype=torch.bool)
    live[dead] = False
    assert torch.equal(model.W_enc[:, live], before["W_enc"][:, live])
    assert torch.equal(model.W_dec[live], before["W_dec"][live]) and torch.equal(model.b_enc[live], before["b_enc"][live])
    # each new decoder row is the unit error of some token of the batch; the encoder reads that token's centred source
    cosines = model.W_dec[dead] @ (residual / residual.norm(dim=1, keepdim=True)).T
    tokens = cosines.argmax(1)
    assert torch.allclose(cosines.max(1).values, torch.ones(3), atol=1e-5)
    centred = x[tokens] - x.mean(0)
    assert torch.allclose(torch.cosine_similarity(model.W_enc[:, dead].T, centred, dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(model.b_enc[dead], -(x.mean(0) @ model.W_enc[:, dead]), atol=1e-5)
    # at the edge of firing on its own token: the pre-activation there is the threshold estimate
    assert torch.allclose((x[tokens] @ model.W_enc[:, dead]).diagonal() + model.b_enc[dead],
                          model.threshold.expand(3), rtol=1e-4)
    assert int(model.tokens_since_fired[dead].sum()) == 0
    if name == "adam":
        state = optimizer.state[model.W_enc]
        assert state["exp_avg"][:, dead].abs().sum() == 0 and state["exp_avg_sq"][:, dead].abs().sum() == 0
        assert state["exp_avg_sq"][:, live].abs().sum() > 0
    else:
        for key in ("z", "x"):
            assert torch.equal(optimizer.state[model.W_dec][key][dead], model.W_dec[dead])


def test_nothing_dead_nothing_changes():
    model, optimizer, x, y = setup("adam")
    model.tokens_since_fired.zero_()
    before = model.W_enc.detach().clone()
    assert resample_dead(model, optimizer, x, y) == 0 and torch.equal(model.W_enc, before)


def test_resampling_stops_before_the_last_30_percent():
    cfg = TranscoderConfig(d_sae=64, k=4, batch_size=100, total_tokens=100 * 100, resample_every=10)
    assert [s for s in range(1, 101) if resampling_due(s, cfg)] == [10, 20, 30, 40, 50, 60, 70]
    assert not any(resampling_due(s, cfg.replace(resample_every=0)) for s in range(1, 101))
    with pytest.raises(ValueError, match="TranscoderConfig.resample_every"):
        cfg.replace(resample_every=-1)
