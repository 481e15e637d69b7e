import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mtc.checkpoint
from mtc import TranscoderConfig
from mtc.checkpoint import list_checkpoints, load_checkpoint
from mtc.language_model import native_bfloat16
from mtc.logger import read_metrics
from mtc.testing import SyntheticStore
from mtc.train import NonFiniteError, StopRequested, Trainer, learning_rate

from conftest import killed_once_written

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, **changes):
    base = dict(d_in=48, d_out=40, d_sae=128, prefix_sizes=[16, 64, 128], k=8, k_aux=16, batch_size=256,
                total_tokens=256 * 30, warmup_steps=3, lr=3e-3, min_lr=3e-4, dead_after_tokens=5000,
                log_every=5, checkpoint_every=10, output_dir=str(tmp_path / "runs"), run_name="syn",
                wandb_mode="disabled", drive_dir="none")
    base.update(changes)
    return TranscoderConfig(**base)


def train(cfg, store=None, **kw):
    store = store or SyntheticStore(cfg.d_in, cfg.d_out, cfg.batch_size)
    trainer = Trainer([cfg], store, progress=False, **kw)
    return trainer, trainer.train()


def test_schedule_reaches_lr_after_warmup_and_min_lr_at_the_end():
    cfg = TranscoderConfig(d_sae=64, k=4, lr=1e-3, min_lr=1e-4, warmup_steps=10, batch_size=100, total_tokens=10_000)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)  # last warmup step
    assert learning_rate(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert learning_rate(cfg.total_steps - 1, cfg) == pytest.approx(1e-4)
    middle = learning_rate((10 + 99) // 2, cfg)
    assert 1e-4 < middle < 1e-3
    lrs = [learning_rate(s, cfg) for s in range(cfg.total_steps)]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_run_dir_layout_and_learning(tmp_path):
    cfg = config(tmp_path, total_tokens=256 * 300, checkpoint_every=100, log_every=50)
    _, (metrics,) = train(cfg)
    run = cfg.run_dir
    assert (run / "config.json").is_file() and TranscoderConfig.load(run / "config.json") == cfg
    assert [p.name for p in list_checkpoints(run)] == ["step_200", "step_300"]  # keep_checkpoints=2
    assert {p.name for p in (run / "checkpoints" / "step_300").iterdir()} == {
        "model.safetensors", "trainer_state.pt", "meta.json", "config.json"}
    assert sorted(p.name for p in (run / "final").iterdir()) == ["config.json", "model.safetensors"]
    lines = read_metrics(run)
    assert [m["step"] for m in lines] == [50, 100, 150, 200, 250, 300]
    assert {"loss", "fvu", "fvu/prefix_1", "fvu_min", "fvu_mean", "fvu_max", "l0", "dead_pct", "dead_pct_100k", "aux_loss",
            "lr", "tokens", "tokens_per_s"} <= set(lines[-1])
    assert metrics["fvu"] == lines[-1]["fvu"] < 0.8 * lines[0]["fvu"]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step_20" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(mtc.checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(cfg)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_10"]
    model, state, meta = load_checkpoint(cfg.run_dir / "checkpoints" / "step_10")
    assert state["step"] == meta["step"] == 10 and torch.isfinite(model.W_dec).all()
    assert not (cfg.run_dir / "checkpoints" / "step_20").exists()


def test_unusable_mirror_does_not_stop_training(tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the mirror's parent should be")
    cfg = config(tmp_path)
    _, (metrics,) = train(cfg, mirror_dirs=[blocker / "mirror"])
    assert (cfg.run_dir / "final" / "model.safetensors").is_file()
    assert len(list_checkpoints(cfg.run_dir)) == 2
    assert "could not copy to the mirror" in capsys.readouterr().err


def test_mirror_receives_checkpoints_and_a_new_machine_resumes_from_it(tmp_path):
    mirror = tmp_path / "drive" / "syn"
    cfg = config(tmp_path, total_tokens=256 * 20)
    train(cfg, mirror_dirs=[mirror])
    assert [p.name for p in list_checkpoints(mirror)] == ["step_10", "step_20"]
    assert (mirror / "final" / "model.safetensors").is_file() and (mirror / "metrics.jsonl").is_file()

    # a fresh machine: nothing local, a longer budget; training continues from the mirror's step 20,
    # and the metrics history logged before the move comes along
    fresh = config(tmp_path / "fresh", total_tokens=256 * 30)
    trainer, _ = train(fresh, mirror_dirs=[mirror])
    assert trainer._resumed and [m["step"] for m in read_metrics(fresh.run_dir)] == [5, 10, 15, 20, 25, 30]


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    train(config(tmp_path))
    with pytest.raises(ValueError, match=r"different run: d_sae: checkpoint has 128, now 256"):
        Trainer([config(tmp_path, d_sae=256, prefix_sizes=[16, 64, 256])], SyntheticStore(48, 40, 256),
                progress=False)
    with pytest.raises(ValueError, match="k: checkpoint has 8, now 4"):
        Trainer([config(tmp_path, k=4)], SyntheticStore(48, 40, 256), progress=False)


class SignalStore(SyntheticStore):
    def __init__(self, *args, signal_at=7, **kwargs):
        super().__init__(*args, **kwargs)
        self.signal_at = signal_at

    def next_batch(self):
        if self.batches_served == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().next_batch()


@pytest.mark.parametrize("recipe", [{}, {"optimizer": "signsgd", "lr": 1e-2, "decoder_init": "batch"},
                                    {"resample_every": 4, "dead_after_tokens": 512},
                                    {"optimizer": "signsgd", "resample_every": 4, "dead_after_tokens": 512}],
                         ids=["adam", "signsgd", "adam-resampling", "signsgd-resampling"])
def test_in_process_resume_is_exact(tmp_path, recipe):
    full = config(tmp_path / "a", **recipe)
    train(full)
    part = config(tmp_path / "b", **recipe)
    with pytest.raises(StopRequested, match="step 13"):  # interrupted: checkpoint at step 13
        train(part, store=SignalStore(48, 40, 256, signal_at=12))
    trainer, _ = train(part)
    assert trainer._resumed
    a, b = load_file(full.run_dir / "final" / "model.safetensors"), load_file(part.run_dir / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["fvu"] for m in read_metrics(full.run_dir)] == [m["fvu"] for m in read_metrics(part.run_dir)]


class NaNStore(SyntheticStore):
    def next_batch(self):
        batch = super().next_batch()
        if self.batches_served == 13:
            batch.sources[0][0, 0] = float("nan")
        return batch


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(NonFiniteError, match=r"became non-finite at step 13; the last good checkpoint is .*step_10.*lower lr"):
        train(cfg, store=NaNStore(48, 40, 256))
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_10"]
    assert not (cfg.run_dir / "final").exists()
    load_checkpoint(cfg.run_dir / "checkpoints" / "step_10")


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(StopRequested, match="step 8"):
        train(cfg, store=SignalStore(48, 40, 256))
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_8"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


# ---------------------------------------------------------------------- the CLI on a tiny model
def cli(tiny_dir, out, *extra, env=None):
    args = [sys.executable, "-m", "mtc", "train", "--model-name", str(tiny_dir), "--layer", "1", "--d-sae", "128",
            "--k", "4", "--batch-size", "64", "--total-tokens", str(64 * 300), "--warmup-steps", "5",
            "--seq-len", "32", "--buffer-tokens", "1024", "--model-batch-size", "8", "--checkpoint-every", "10",
            "--log-every", "10", "--drive-dir", "none", "--output-dir", str(out), "--run-name", "r", "--dataset", "pydoc",
            "--no-progress", *extra]
    return args


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def test_sigkill_at_any_point_then_resume_gives_bit_identical_weights(tiny_dirs, tmp_path):
    env = clean_env(WANDB_MODE="disabled")
    reference = subprocess.run(cli(tiny_dirs["gemma2"], tmp_path / "ref"), env=env, capture_output=True, text=True,
                               timeout=300, cwd=REPO)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    killed_once_written(cli(tiny_dirs["gemma2"], out), out / "r" / "checkpoints" / "step_30", env, REPO)
    assert not (out / "r" / "final").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(cli(tiny_dirs["gemma2"], out), env=env, capture_output=True, text=True, timeout=300,
                             cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stderr
    a = load_file(tmp_path / "ref" / "r" / "final" / "model.safetensors")
    b = load_file(out / "r" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["fvu"] for m in read_metrics(tmp_path / "ref" / "r")] == [m["fvu"] for m in read_metrics(out / "r")]


def test_demo_preset_end_to_end_without_wandb_key_or_tty(tiny_dirs, tmp_path):
    """The demo preset on a tiny model through the CLI, with no W&B key, no TTY and WANDB_MODE unset:
    it must not prompt (a prompt would hang until the timeout) and must log offline."""
    args = [sys.executable, "-m", "mtc", "train", "--preset", "demo", "--model-name", str(tiny_dirs["gemma2"]),
            "--layer", "1", "--total-tokens", str(512 * 40), "--buffer-tokens", "8192", "--output-dir",
            str(tmp_path), "--drive-dir", "none", "--no-progress"]
    result = subprocess.run(args, env=clean_env(HOME=str(tmp_path)), stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "W&B: offline, no API key found" in result.stderr
    assert f"run_dir: {tmp_path / 'demo'}" in result.stdout
    last = read_metrics(tmp_path / "demo")[-1]
    assert (f"dead={last['dead_pct_100k']:.1f}% (silent for 100,000 tokens; {last['dead_pct']:.1f}% in the AuxK "
            f"window of 1,280)") in result.stdout
    assert (tmp_path / "demo" / "final" / "model.safetensors").is_file()
    assert list((tmp_path / "demo" / "wandb").glob("offline-run-*"))
    assert [m["step"] for m in read_metrics(tmp_path / "demo")] == [25, 40]
    # the preset's model_dtype "auto": bfloat16 where this CPU computes it natively
    assert f"(language model in {'bfloat16' if native_bfloat16('cpu') else 'float32'})" in result.stderr


def test_cli_rejects_bad_settings_before_loading_a_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtc", "train", "--model-name", "/nonexistent/model",
                             "--prefix-sizes", "8", "4", "--d-sae", "16", "--k", "2"],
                            env=clean_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "TranscoderConfig.prefix_sizes: must be strictly increasing" in result.stderr


def test_starting_afresh_over_an_old_run_is_refused(tmp_path):
    train(config(tmp_path))
    with pytest.raises(ValueError, match=r"already holds checkpoints of a run \(steps \[20, 30\]\).*new run_name"):
        Trainer([config(tmp_path)], SyntheticStore(48, 40, 256), progress=False, resume="never")


def test_resume_from_the_mirror_keeps_the_mirrors_metrics_history(tmp_path):
    mirror = tmp_path / "drive" / "syn"
    with pytest.raises(StopRequested):
        train(config(tmp_path / "a"), store=SignalStore(48, 40, 256, signal_at=12), mirror_dirs=[mirror])
    fresh = config(tmp_path / "fresh")
    train(fresh, mirror_dirs=[mirror])
    steps = [m["step"] for m in read_metrics(mirror)]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_a_run_diverging_while_finite_is_warned_about(tmp_path, capsys):
    cfg = config(tmp_path, lr=30.0, min_lr=30.0, warmup_steps=0, total_tokens=256 * 40, log_every=5,
                 checkpoint_every=100)
    _, (metrics,) = train(cfg)
    assert metrics["fvu"] > 2 and math.isfinite(metrics["fvu"])
    err = capsys.readouterr().err
    assert "syn is diverging: FVU above 2 and not improving for 3 log intervals" in err and "lower lr (now 30)" in err


def test_a_healthy_run_gets_no_divergence_warning(tmp_path, capsys):
    train(config(tmp_path))
    assert "diverging" not in capsys.readouterr().err


def test_dead_share_counts_latents_silent_for_the_fixed_window_not_the_auxk_window(tmp_path, monkeypatch):
    import mtc.train

    monkeypatch.setattr(mtc.train, "DEAD_SHARE_TOKENS", 256 * 20)  # 20 steps stand in for 100,000 tokens
    cfg = config(tmp_path, d_sae=1024, prefix_sizes=[16, 64, 1024], k=2, total_tokens=256 * 60, log_every=60,
                 dead_after_tokens=256)  # 512 firings per batch over 1,024 latents: many skip a batch
    trainer, (metrics,) = train(cfg)
    since_fired = trainer.runs[0].model.tokens_since_fired
    assert metrics["dead_pct_100k"] == pytest.approx(100.0 * float((since_fired >= 256 * 20).float().mean()))
    assert metrics["dead_pct"] > metrics["dead_pct_100k"]  # a one-batch window counts latents that skipped a batch
