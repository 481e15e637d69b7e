import json

import pytest
import torch

from mtc import TranscoderConfig
from mtc.cli import main
from mtc.quality import ActivationCache, CachedStore, collect_cache, evaluate_cached, format_quality, run_quality
from mtc.testing import SyntheticStore


def synthetic_cache(n_train=256 * 40, n_eval=1024, d_in=48, d_out=40):
    store = SyntheticStore(d_in, d_out, n_train + n_eval, n_features=96)
    batch = store.next_batch()
    x, y = batch.sources[0], batch.targets[0]
    return ActivationCache(train_source=x[:n_train], train_target=y[:n_train], eval_source=x[n_train:],
                           eval_target=y[n_train:], meta={"model_name": "synthetic"})


def test_cache_round_trips_through_its_file(tmp_path):
    cache = synthetic_cache(n_train=300, n_eval=50)
    loaded = ActivationCache.load(cache.save(tmp_path / "cache.safetensors"))
    for name in ("train_source", "train_target", "eval_source", "eval_target"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name))
    assert loaded.meta == {"model_name": "synthetic"}
    held_out = ActivationCache.load(tmp_path / "cache.safetensors", train=False)
    assert torch.equal(held_out.eval_source, cache.eval_source) and torch.equal(held_out.eval_target, cache.eval_target)
    assert held_out.train_source.shape == (0, cache.train_source.shape[1]) and len(held_out.train_target) == 0
    with pytest.raises(FileNotFoundError, match="bench --quality --cache"):
        ActivationCache.load(tmp_path / "missing.safetensors")


def test_cached_store_serves_rows_in_order_and_resumes():
    cache = synthetic_cache(n_train=100, n_eval=10)
    store = CachedStore(cache, batch_size=30)
    first = store.next_batch()
    assert torch.equal(first.sources[0], cache.train_source[:30])
    state = store.state_dict()
    second = store.next_batch()
    store.load_state_dict(state)
    assert torch.equal(store.next_batch().targets[0], second.targets[0])
    assert torch.equal(store.next_batch().sources[0], cache.train_source[60:90])  # the third and last batch
    assert torch.equal(store.next_batch().sources[0], cache.train_source[60:90]), "past the budget: newest first"
    assert torch.equal(store.next_batch().sources[0], cache.train_source[30:60])


def test_cached_evaluation_matches_a_hand_computed_fvu():
    from mtc import MatryoshkaTranscoder

    cache = synthetic_cache(n_train=100, n_eval=200)
    model = MatryoshkaTranscoder(TranscoderConfig(d_in=48, d_out=40, d_sae=64, prefix_sizes=[16, 64], k=4))
    report = evaluate_cached(model, cache, batch_size=64)
    y = cache.eval_target.double()
    expected = float((y - model(cache.eval_source).double()).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert report["full"]["fvu"] == pytest.approx(expected, rel=1e-6)
    assert [row["latents"] for row in report["prefixes"]] == [16, 64]


def test_quality_trains_plain_and_matryoshka_on_the_same_rows(tmp_path):
    cfg = TranscoderConfig(d_in=48, d_out=40, d_sae=128, prefix_sizes=[16, 64, 128], k=8, k_aux=16, batch_size=256,
                           total_tokens=256 * 40, warmup_steps=4, lr=3e-2, min_lr=3e-3, dead_after_tokens=2560,
                           output_dir=str(tmp_path), run_name="q", wandb_mode="disabled", drive_dir="none",
                           samples_every=0, log_every=10, checkpoint_every=1000, calibration_tokens=1024)
    reports = run_quality(cfg, synthetic_cache())
    assert list(reports) == ["plain", "matryoshka"]
    assert len(reports["plain"]["prefixes"]) == 1 and len(reports["matryoshka"]["prefixes"]) == 3
    for report in reports.values():
        assert report["full"]["fvu"] < 0.9 and report["full"]["l0"] == pytest.approx(8, rel=0.25)
    table = format_quality(reports)
    assert "matryoshka" in table and "dead% (eval)" in table
    with pytest.raises(ValueError, match="d_in=32"):
        run_quality(cfg.replace(d_in=32), synthetic_cache(n_train=300, n_eval=10))


def bench_quality_args(tmp_path, out):
    """`mtc bench --quality` on a small synthetic cache, its report to `out`."""
    cache_path = synthetic_cache().save(tmp_path / "cache.safetensors")
    return ["bench", "--quality", "--cache", str(cache_path), "--json", str(out), "--output-dir",
            str(tmp_path / "runs"), "--d-sae", "128", "--prefix-sizes", "16", "64", "128", "--k", "8",
            "--k-aux", "16", "--batch-size", "256", "--total-tokens", str(256 * 20), "--warmup-steps", "2",
            "--calibration-tokens", "512", "--device", "cpu"]


def test_bench_quality_command_reads_an_existing_cache(tmp_path, capsys):
    out = tmp_path / "quality.json"
    args = bench_quality_args(tmp_path, out) + ["--model-dtype", "float32"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"plain", "matryoshka"}
    assert main(args) == 0  # a second benchmark replaces the first one's runs
    err = capsys.readouterr().err
    assert "--sparsify-python" in err and "note:" not in err
    assert main(args + ["--model-dtype", "bfloat16"]) == 0  # the cache came from a float32 model: said, and used
    assert "holds activations of the language model in float32, model_dtype=bfloat16" in capsys.readouterr().err


def test_collect_cache_holds_the_training_batches_in_serving_order(tmp_path, gemma2_bridge):
    from mtc.activations import build_store

    cfg = TranscoderConfig(model_name="tiny", source_hook="blocks.1.ln2.hook_normalized",
                           target_hook="blocks.1.hook_mlp_out", d_in=64, d_out=64, d_sae=128, k=4, batch_size=64,
                           total_tokens=64 * 5, seq_len=16, model_batch_size=4, buffer_tokens=256, dataset="pydoc",
                           warmup_steps=0)
    cache = collect_cache(gemma2_bridge, cfg, eval_tokens=100)
    batches = [build_store(gemma2_bridge, [cfg]).next_batch() for _ in range(1)]
    assert cache.train_source.shape == (320, 64) and cache.eval_source.shape == (100, 64)
    torch.testing.assert_close(cache.train_source[:64], batches[0].sources[0])
    assert cache.meta["source_hook"] == cfg.source_hook and cache.meta["model_dtype"] == "float32"


FAKE_SPARSIFY = """#!/bin/sh
# stands in for a sparsify virtualenv's python: records its arguments, writes quality_sparsify.py's JSON
while [ "$#" -gt 0 ]; do
  case "$1" in --json) out="$2"; shift;; esac
  echo "$1" >> "$(dirname "$0")/args.txt"; shift
done
cat > "$out" <<JSON
{"fvu": 0.25, "fvu_first_16": 0.8, "l0": 7.5, "l0_first_16": 1.0, "dead_pct_eval": 40.0,
 "dead_pct_train": 30.0, "train_seconds": 1.0,
 "settings": {"first_latents": 16, "d_sae": 128, "eval_tokens": 1024}}
JSON
"""


def test_bench_quality_adds_sparsify_in_mtc_units_from_its_python(tmp_path, capsys):
    fake = tmp_path / "venv" / "python"
    fake.parent.mkdir()
    fake.write_text(FAKE_SPARSIFY)
    fake.chmod(0o755)
    out = tmp_path / "quality.json"
    args = bench_quality_args(tmp_path, out)
    assert main(args + ["--sparsify-python", str(tmp_path / "missing" / "python")]) != 0
    assert "--sparsify-python" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # the check comes before any training
    assert main(args + ["--sparsify-python", str(fake)]) == 0
    passed = (fake.parent / "args.txt").read_text().split()
    assert passed[passed.index("--normalize") + 1] == "mean_norm"
    assert [passed[passed.index(flag) + 1] for flag in ("--d-sae", "--k", "--batch-size", "--first-latents")] \
        == ["128", "8", "256", "16"]
    sparsify = json.loads(out.read_text())["sparsify"]
    assert sparsify["full"]["fvu"] == 0.25 and sparsify["prefixes"][0]["fvu"] == 0.8
    assert sparsify["train"]["dead_pct"] == 30.0
    assert "sparsify" in capsys.readouterr().out
