import math

import pytest
import torch

from mtc import MatryoshkaTranscoder, TranscoderConfig
from mtc.checkpoint import load, save
from mtc.scaling import ActivationScales, mean_norm_scale


def random_model(**changes):
    base = dict(d_in=24, d_out=20, d_sae=96, prefix_sizes=[16, 48, 96], k=6, batch_size=32, total_tokens=3200,
                warmup_steps=0, skip_connection=True)
    base.update(changes)
    model = MatryoshkaTranscoder(TranscoderConfig(**base))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        model.normalize_decoder()
        model.threshold.fill_(0.2)
    return model


def test_scale_brings_the_mean_norm_to_sqrt_d():
    for magnitude in (1e-3, 0.7, 12.0, 665.0, 3e4):
        acts = torch.randn(512, 640) * magnitude + magnitude
        scale = mean_norm_scale(acts)
        assert float((acts / scale).norm(dim=-1).mean()) == pytest.approx(math.sqrt(640), rel=1e-5)


def test_scale_refuses_all_zero_activations():
    with pytest.raises(ValueError, match="all zero or non-finite"):
        mean_norm_scale(torch.zeros(8, 4))


def test_folded_model_equals_normalise_model_unnormalise():
    model = random_model()
    scales = ActivationScales(source=0.3, target=61.7)
    folded = MatryoshkaTranscoder(model.cfg)
    folded.load_state_dict(scales.fold(model.state_dict()))
    x = torch.randn(50, model.cfg.d_in) * 3
    for prefix in (1, 2, None):
        expected = model(x / scales.source, prefix=prefix) * scales.target
        torch.testing.assert_close(folded(x, prefix=prefix), expected, rtol=1e-4, atol=1e-3)
        latents = model.encode(x / scales.source, prefix=prefix) * scales.target
        torch.testing.assert_close(folded.encode(x, prefix=prefix), latents, rtol=1e-4, atol=1e-3)
        assert torch.equal(folded.encode(x, prefix=prefix) > 0, latents > 0)
    assert torch.equal(folded.W_dec, model.W_dec), "decoder rows stay unit-norm; latents carry the target's units"


def test_save_writes_raw_units(tmp_path):
    model = random_model()
    scales = ActivationScales(source=0.5, target=251.3)
    saved = load(save(model, tmp_path / "m", scales))
    x = torch.randn(10, model.cfg.d_in)
    torch.testing.assert_close(saved(x), model(x / scales.source) * scales.target, rtol=1e-5, atol=1e-3)


def test_scales_round_trip_and_default_to_raw_units_for_old_checkpoints():
    scales = ActivationScales(source=0.125, target=32.0)
    assert ActivationScales.from_dict(scales.to_dict()) == scales
    assert ActivationScales.from_dict(None).is_identity


def test_config_rejects_an_unknown_normalisation():
    with pytest.raises(ValueError, match="normalize_activations"):
        TranscoderConfig(normalize_activations="layer_norm")


class ScaledStore:
    """A store whose activations are in other units: sources times `source_factor`, targets times `target_factor`."""

    def __init__(self, store, source_factor: float, target_factor: float):
        self.store, self.source_factor, self.target_factor = store, source_factor, target_factor

    def next_batch(self):
        batch = self.store.next_batch()
        batch.sources = [x * self.source_factor for x in batch.sources]
        batch.targets = [y * self.target_factor for y in batch.targets]
        return batch

    def state_dict(self):
        return self.store.state_dict()

    def load_state_dict(self, state):
        self.store.load_state_dict(state)


def train_in_units(tmp_path, name, source_factor, target_factor, **changes):
    from mtc.testing import SyntheticStore
    from mtc.train import Trainer

    base = dict(d_in=48, d_out=40, d_sae=128, prefix_sizes=[16, 64, 128], k=8, k_aux=16, batch_size=256,
                total_tokens=256 * 120, warmup_steps=10, lr=3e-2, min_lr=3e-3, dead_after_tokens=2560,
                log_every=20, checkpoint_every=1000, output_dir=str(tmp_path), run_name=name, wandb_mode="disabled",
                drive_dir="none", samples_every=0, calibration_tokens=2048)
    base.update(changes)
    cfg = TranscoderConfig(**base)
    store = ScaledStore(SyntheticStore(cfg.d_in, cfg.d_out, cfg.batch_size, n_features=96), source_factor,
                        target_factor)
    (metrics,) = Trainer([cfg], store, progress=False).train()
    return metrics


def test_training_does_not_depend_on_the_units_of_the_hooks(tmp_path):
    """Targets x100 and sources x0.01 give the same FVU and dead share; without normalisation they do not."""
    plain = train_in_units(tmp_path, "plain", 1.0, 1.0)
    rescaled = train_in_units(tmp_path, "rescaled", 0.01, 100.0)
    assert plain["fvu"] < 0.5, "the synthetic features must be learnable for this test to mean anything"
    assert rescaled["fvu"] == pytest.approx(plain["fvu"], rel=0.01)
    assert rescaled["dead_pct"] == pytest.approx(plain["dead_pct"], abs=2.0)
    raw = train_in_units(tmp_path, "raw", 0.01, 100.0, normalize_activations="none")
    assert raw["fvu"] > plain["fvu"] + 0.1 or raw["dead_pct"] > plain["dead_pct"] + 20


def test_after_training_the_in_memory_model_is_the_raw_unit_final_model(tmp_path):
    from mtc.testing import SyntheticStore
    from mtc.train import Trainer

    cfg = TranscoderConfig(d_in=48, d_out=40, d_sae=64, k=4, batch_size=128, total_tokens=128 * 10, warmup_steps=2,
                           output_dir=str(tmp_path), run_name="r", wandb_mode="disabled", drive_dir="none",
                           samples_every=0, calibration_tokens=256)
    store = ScaledStore(SyntheticStore(48, 40, 128), 0.01, 100.0)
    trainer = Trainer([cfg], store, progress=False)
    trainer.train()
    final = load(tmp_path / "r" / "final")
    for name, tensor in final.state_dict().items():
        assert torch.equal(trainer.runs[0].model.state_dict()[name], tensor), name
