"""The benchmark command: it runs end to end on CPU (short mode) and its figures are consistent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtc import TranscoderConfig
from mtc.bench import ratios, step_flops
from mtc.transcoder import MatryoshkaTranscoder

REPO = Path(__file__).resolve().parents[1]


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "mtc", "bench", "--device", "cpu", "--json", str(out), *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def check_part(part, batch_size=None):
    assert part["tokens_per_s"] > 0 and part["peak_memory_bytes"] > 0
    if batch_size is not None:
        assert part["batch_size"] == batch_size
        assert part["ms_per_step"] == pytest.approx(1000 * batch_size / part["tokens_per_s"])


@pytest.mark.slow
def test_short_bench_on_the_offline_model_measures_every_part(tmp_path):
    report, stdout = bench(tmp_path, "--short")
    parts = report["parts"]
    assert set(parts) == {"forward", "pipeline", "step"}
    check_part(parts["forward"])
    check_part(parts["pipeline"])
    check_part(parts["step"], batch_size=512)
    assert parts["pipeline"]["tokens"] == parts["pipeline"]["steps"] * 512
    assert 0 < parts["pipeline"]["fvu"] < 10
    assert report["config"]["d_in"] == 640  # read from the model
    assert report["ratios"]["pipeline_over_forward"] == pytest.approx(
        parts["pipeline"]["tokens_per_s"] / parts["forward"]["tokens_per_s"])
    assert "| forward (to deepest hook) |" in stdout and "pipeline over forward" in stdout


def test_synthetic_bench_needs_no_model(tmp_path):
    report, stdout = bench(tmp_path, "--synthetic", "--short", "--d-sae", "512", "--batch-size", "128", "--k", "8",
                           "--prefix-sizes", "64", "192", "512", "--dead-fraction", "0.25")
    assert set(report["parts"]) == {"step"}
    check_part(report["parts"]["step"], batch_size=128)
    assert report["config"]["d_in"] == 640 and report["parts"]["step"]["dead_fraction"] == 0.25
    assert report["ratios"] == {}
    assert "transcoder step alone" in stdout


def test_random_weights_bench_on_a_local_architecture(tmp_path, tiny_dirs):
    report, _ = bench(tmp_path, "--short", "--random-weights", "--model-name", str(tiny_dirs["gemma2"]),
                      "--source-hook", "blocks.1.ln2.hook_normalized", "--target-hook", "blocks.1.hook_mlp_out",
                      "--d-sae", "256", "--k", "4", "--prefix-sizes", "32", "256", "--batch-size", "64",
                      "--seq-len", "32", "--model-batch-size", "4")
    assert report["random_weights"] and report["config"]["d_in"] == 64
    for part in ("forward", "pipeline", "step"):
        check_part(report["parts"][part])


def test_step_flops_counts_the_dense_encoder_and_the_active_entries():
    cfg = TranscoderConfig(d_in=16, d_out=12, d_sae=64, k=4, batch_size=32, total_tokens=320, warmup_steps=0,
                           skip_connection=True)
    model = MatryoshkaTranscoder(cfg)
    out = model.training_forward(torch.randn(32, 16), torch.randn(32, 12))
    n_main = len(out.active[0])
    assert n_main == 4 * 32
    n_aux = 32 * 8
    expected = 2 * 32 * 16 * 64 + 2 * (n_main + n_aux) * 16 + 6 * (n_main + n_aux) * 12 + 4 * 32 * 16 * 12
    assert step_flops(cfg, out, n_aux) == expected


def test_ratios_need_the_forward_figure():
    parts = {"forward": {"tokens_per_s": 1000.0}, "pipeline": {"tokens_per_s": 900.0}, "step": {"tokens_per_s": 5000.0}}
    assert ratios(parts) == {"pipeline_over_forward": 0.9, "step_over_forward": 5.0}
    assert ratios({"step": {"tokens_per_s": 5000.0}}) == {}


def test_bench_config_fits_any_preset_to_the_measured_fills(tmp_path):
    from mtc.bench import BenchSettings, bench_config

    cfg = bench_config(BenchSettings(preset="gemma2-2b-l17", fills=2, overrides={"dataset": "pydoc"}), tmp_path)
    assert cfg.total_steps == 2 * (262_144 // 4096) and cfg.k == 96 and cfg.d_sae == 18_432
    assert cfg.wandb_mode == "disabled" and cfg.drive_dir == "none" and cfg.output_dir == str(tmp_path)
    short = bench_config(BenchSettings(preset="gemma2-2b-l17", fills=1, short=True), tmp_path)
    assert short.buffer_tokens == 4 * 4096 and short.total_steps == 4
