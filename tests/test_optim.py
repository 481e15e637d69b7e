import pytest
import torch

from mtc import TranscoderConfig
from mtc.optim import ScheduleFreeSignSGD, learning_rate, make_optimizer, train_step, weights_to_keep
from mtc.transcoder import MatryoshkaTranscoder


def test_schedule_free_sign_descent_follows_its_formulas():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    rows = torch.nn.Parameter(torch.randn(2, 4))
    optimizer = ScheduleFreeSignSGD([p, rows], lr=0.1, momentum=0.9, unit_rows=(rows,))
    z, x = p.detach().clone(), p.detach().clone()
    z_rows, x_rows = rows.detach().clone(), rows.detach().clone()
    weight_sum = 0.0
    for lr in (0.05, 0.1, 0.1, 0.1):  # a warmup step, then the peak rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = (p ** 3).sum() + (rows * torch.arange(4.0)).sum()
        optimizer.zero_grad()
        loss.backward()
        grad, grad_rows = p.grad.clone(), rows.grad.clone()
        optimizer.step()
        weight_sum += lr ** 2
        c = lr ** 2 / weight_sum
        z = z - lr * grad.sign()
        x = x + c * (z - x)
        z_rows = z_rows - lr * grad_rows.sign()
        z_rows = z_rows / z_rows.norm(dim=1, keepdim=True)
        x_rows = x_rows + c * (z_rows - x_rows)
        assert torch.allclose(p, 0.9 * x + 0.1 * z, atol=1e-6)
        assert torch.allclose(rows, 0.9 * x_rows + 0.1 * z_rows, atol=1e-6)
    averaged = optimizer.averaged()
    assert torch.allclose(averaged[p], x, atol=1e-6) and torch.allclose(averaged[rows], x_rows, atol=1e-6)
    assert torch.allclose(optimizer.state[rows]["z"].norm(dim=1), torch.ones(2))


def small(**changes):
    settings = dict(d_in=24, d_out=20, d_sae=64, prefix_sizes=[16, 64], k=4, k_aux=8, batch_size=64,
                    total_tokens=64 * 20, warmup_steps=2, lr=1e-2, min_lr=1e-3)
    return TranscoderConfig(**{**settings, **changes})


def test_signsgd_keeps_its_rate_after_the_warmup_and_adam_decays():
    signsgd, adam = small(optimizer="signsgd"), small()
    assert learning_rate(0, signsgd) == learning_rate(0, adam) == pytest.approx(5e-3)
    assert learning_rate(signsgd.total_steps - 1, signsgd) == pytest.approx(1e-2)
    assert learning_rate(adam.total_steps - 1, adam) == pytest.approx(1e-3)


def test_the_kept_weights_are_the_average_and_training_continues_from_the_gradient_point():
    torch.manual_seed(0)
    cfg = small(optimizer="signsgd")
    model = MatryoshkaTranscoder(cfg)
    optimizer = make_optimizer(model, cfg)
    x, y = torch.randn(64, 24), torch.randn(64, 20)
    for _ in range(3):
        train_step(model, optimizer, x, y, lr=1e-2)
    kept = weights_to_keep(model, optimizer)
    assert kept is not model
    for name, p in model.named_parameters():
        assert torch.equal(dict(kept.named_parameters())[name], optimizer.state[p]["x"])
        assert not torch.equal(p, optimizer.state[p]["x"])  # training holds the point between iterate and average
    adam = make_optimizer(model, small())
    assert weights_to_keep(model, adam) is model


def test_batch_decoder_init_starts_each_row_at_its_tokens_mean_target():
    torch.manual_seed(0)
    cfg = small(decoder_init="batch", k=2)
    model = MatryoshkaTranscoder(cfg)
    random_rows = model.W_dec.detach().clone()
    x, y = torch.randn(64, 24), torch.randn(64, 20) + 3.0
    model.init_from_batch(x, y)
    pre = torch.relu(x @ model.W_enc + model.b_enc)
    kept = pre.flatten().topk(2 * 64).values.min()
    z = torch.where(pre >= kept, pre, 0.0)
    selected = z.sum(0) > 0
    expected = z.T @ (y - y.mean(0))
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert 0 < int(selected.sum()) < cfg.d_sae
    assert torch.allclose(model.W_dec[selected], expected[selected], atol=1e-5)
    assert torch.equal(model.W_dec[~selected], random_rows[~selected])


def test_unknown_optimizer_or_decoder_init_names_the_field():
    with pytest.raises(ValueError, match="TranscoderConfig.optimizer: unknown optimiser 'sgd'"):
        small(optimizer="sgd")
    with pytest.raises(ValueError, match="TranscoderConfig.decoder_init: unknown decoder initialisation"):
        small(decoder_init="zero")
