import json

import numpy as np
import pytest
import torch

import mtc
from mtc import MatryoshkaTranscoder, TranscoderConfig


def trained_model(**changes):
    base = dict(d_in=16, d_out=12, d_sae=64, prefix_sizes=[8, 24, 64], k=4, batch_size=32,
                total_tokens=3200, warmup_steps=0)
    base.update(changes)
    model = MatryoshkaTranscoder(TranscoderConfig(**base))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        out = model.training_forward(torch.randn(32, 16), torch.randn(32, 12))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = trained_model(skip_connection=True)
    mtc.save(model, tmp_path / "m")
    loaded = mtc.load(tmp_path / "m")
    assert loaded.cfg == model.cfg
    before, after = model.state_dict(), loaded.state_dict()
    assert set(before) == set(after) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"}
    for name in before:
        assert torch.equal(before[name], after[name]), name
    x = torch.randn(9, 16)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "m").iterdir())


def test_load_rejects_weights_that_do_not_match_the_config(tmp_path):
    mtc.save(trained_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["d_sae"], cfg["prefix_sizes"] = 128, [8, 24, 128]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_enc: file has \[16, 64\].*expects \[16, 128\]"):
        mtc.load(tmp_path / "m")


def test_load_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        mtc.load(tmp_path)
    TranscoderConfig(d_sae=8, k=2, total_tokens=4096, warmup_steps=0).save(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        mtc.load(tmp_path)


def test_gemma_scope_export_reproduced_by_numpy_jumprelu(tmp_path):
    model = trained_model().eval()
    path = mtc.export_gemma_scope(model, tmp_path / "gemma_scope")
    params = np.load(path)
    assert sorted(params.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert params["W_enc"].shape == (16, 64) and params["W_dec"].shape == (64, 12)
    assert params["threshold"].shape == (64,)

    x = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    pre = x @ params["W_enc"] + params["b_enc"]
    acts = pre * (pre > params["threshold"])  # Gemma Scope's JumpReLU
    expected = acts @ params["W_dec"] + params["b_dec"]
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_gemma_scope_export_refuses_a_skip_path(tmp_path):
    with pytest.raises(ValueError, match="no skip path"):
        mtc.export_gemma_scope(trained_model(skip_connection=True), tmp_path)


def test_bfloat16_transcoder_keeps_a_float32_threshold(tmp_path):
    model = MatryoshkaTranscoder(TranscoderConfig(d_in=16, d_out=12, d_sae=64, k=4, dtype="bfloat16",
                                                  total_tokens=3200, batch_size=32, warmup_steps=0))
    assert model.W_enc.dtype == torch.bfloat16 and model.threshold.dtype == torch.float32
    x, y = torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(32, 12, dtype=torch.bfloat16)
    model.training_forward(x, y)
    first = float(model.threshold)
    model.training_forward(x * 1.01, y)  # a 1% move of the EMA input must register
    assert float(model.threshold) != first
    mtc.save(model, tmp_path / "m")
    assert mtc.load(tmp_path / "m").threshold.dtype == torch.float32
