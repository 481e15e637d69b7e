"""The embedded offline Gemma-3-270M end to end (slow: the first run converts it from GGUF, ~1 min)."""

import pytest
import torch

from mtc import TranscoderConfig
from mtc.activations import build_store
from mtc.language_model import OFFLINE_MODEL, default_hooks, fit_config_to_model, load_language_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    return load_language_model(OFFLINE_MODEL)


def test_offline_model_gives_real_mlp_activation_pairs(gemma3):
    assert gemma3.cfg.n_layers == 18 and gemma3.cfg.d_model == 640
    source, target = default_hooks(6)
    cfg = fit_config_to_model(TranscoderConfig(model_name=OFFLINE_MODEL, source_hook=source, target_hook=target,
                                               d_sae=1024, k=16, batch_size=256, total_tokens=256 * 10,
                                               warmup_steps=0, seq_len=64, buffer_tokens=1024, model_batch_size=8,
                                               dataset="pydoc"),
                              gemma3)
    assert (cfg.d_in, cfg.d_out) == (640, 640)
    store = build_store(gemma3, [cfg])
    batch = store.next_batch()
    x, y = batch.sources[0], batch.targets[0]
    assert x.shape == (256, 640) and torch.isfinite(x).all() and torch.isfinite(y).all()
    # RMS-normalised input: every token's mean square is 1
    torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(256), rtol=1e-3, atol=1e-3)
    assert y.std() > 0

    # the served pair equals a plain forward of the same context at the same position
    first = int(batch.context_ids[0]), int(batch.positions[0])
    tokens = next(t for i, t in enumerate(store.make_contexts()) if i == first[0])
    with torch.no_grad():
        _, cache = gemma3.run_with_cache(tokens[None], names_filter=[source, target])
    torch.testing.assert_close(cache[source][0, first[1]], x[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache[target][0, first[1]], y[0], rtol=1e-4, atol=1e-4)


def test_offline_model_predicts_text(gemma3):
    tokens = gemma3.to_tokens("The capital of France is")
    with torch.no_grad():
        logits = gemma3(tokens)
    top5 = [gemma3.tokenizer.decode(i).strip() for i in logits[0, -1].topk(5).indices]
    assert "Paris" in top5, top5  # a random model would almost never rank it in 262k tokens


def test_short_demo_run_on_the_offline_model_evaluates(gemma3, tmp_path):
    """A few steps of the demo preset through the Trainer, then the splice evaluation on held-out text."""
    from mtc.evaluate import evaluate, held_out_contexts
    from mtc.presets import PRESETS
    from mtc.samples import load_samples
    from mtc.train import Trainer

    settings = {**PRESETS["demo"], "total_tokens": 512 * 30, "warmup_steps": 2, "log_every": 10,
                "checkpoint_every": 30, "buffer_tokens": 4096, "output_dir": str(tmp_path), "drive_dir": "none",
                "wandb_mode": "disabled", "samples_every": 5}
    cfg = fit_config_to_model(TranscoderConfig(**settings), gemma3)
    trainer = Trainer([cfg], build_store(gemma3, [cfg]), progress=False)
    (metrics,) = trainer.train()
    assert metrics["fvu"] < 1.0  # random latents start above 1 (they add noise to b_dec = the mean)
    samples = load_samples(cfg.run_dir)
    assert samples.tokens_seen == 6 * 512

    report = evaluate(trainer.runs[0].model, gemma3, held_out_contexts(gemma3, "pydoc", 256, 64), batch_size=2)
    assert report["ce_zero_ablation"] > report["ce_clean"]
    rows = report["prefixes"]
    assert [r["latents"] for r in rows] == cfg.prefix_sizes
    assert all(0 < r["fvu"] < 1.5 and r["kl_div"] >= 0 for r in rows)
    assert rows[-1]["l0"] > rows[0]["l0"]
