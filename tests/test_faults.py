"""Faults a Colab user meets, each through `python -m mtc train` on a tiny model: a damaged checkpoint, W&B
without a key, two runs in one run dir, a full disk, a shrunk budget, an interrupted prune, a network
error. Each ends in a clear message, a fallback or a refusal: never a traceback or a hang."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

import mtc.checkpoint
from mtc.checkpoint import list_checkpoints, load_checkpoint
from mtc.cli import main
from mtc.language_model import explain_load_error

REPO = Path(__file__).resolve().parents[1]


def copy_run(trained_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained_run, out / "r")
    return out


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def zero_fill(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


DAMAGES = {
    "half-synced copy (no trainer_state.pt)": ("trainer_state.pt", lambda p: p.unlink()),
    "truncated model.safetensors": ("model.safetensors", truncate),
    "zero-filled model.safetensors": ("model.safetensors", zero_fill),
    "truncated trainer_state.pt": ("trainer_state.pt", truncate),
}


# ---------------------------------------------------------------------- 1. damaged newest checkpoint
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, trained_run, tiny_dirs, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    name, spoil = DAMAGES[damage]
    spoil(out / "r" / "checkpoints" / "step_30" / name)
    assert main(train_args(tiny_dirs["gemma2"], out, steps=40)) == 0  # a longer budget: training continues
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {out / 'r' / 'checkpoints' / 'step_30'}: {name}" in err
    assert "resumed from step 20" in err and "Traceback" not in err
    assert [p.name for p in list_checkpoints(out / "r")] == ["step_30", "step_40"]  # the damaged one rewritten
    assert load_checkpoint(out / "r" / "checkpoints" / "step_40")[1]["step"] == 40


def test_a_half_synced_mirror_checkpoint_on_a_fresh_machine_falls_back(trained_run, tiny_dirs, tmp_path, capsys):
    drive = tmp_path / "drive"
    shutil.copytree(trained_run, drive / "r")
    (drive / "r" / "checkpoints" / "step_30" / "model.safetensors").unlink()  # Drive had not synced it yet
    args = train_args(tiny_dirs["gemma2"], tmp_path / "fresh", "--drive-dir", str(drive), steps=40)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {drive / 'r' / 'checkpoints' / 'step_30'}: model.safetensors is missing" in err
    assert f"resumed from step 20 ({drive / 'r' / 'checkpoints' / 'step_20'})" in err
    assert [p.name for p in list_checkpoints(drive / "r")] == ["step_30", "step_40"]
    assert load_checkpoint(drive / "r" / "checkpoints" / "step_30")[1]["step"] == 30  # rewritten whole


# ---------------------------------------------------------------------- 2. W&B online without a key
def test_wandb_online_without_a_key_is_refused_before_the_model_loads(no_wandb_key, model_loads, tiny_dirs,
                                                                      tmp_path, capsys):
    assert main(train_args(tiny_dirs["gemma2"], tmp_path, "--wandb-mode", "online")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: wandb_mode: online needs a W&B API key")
    assert "WANDB_API_KEY" in err and "wandb login" in err and "--wandb-mode offline" in err
    assert model_loads == [] and not (tmp_path / "r").exists()


def test_wandb_online_with_a_key_passes_the_check(monkeypatch, no_wandb_key):
    from mtc.logger import check_wandb_key

    with pytest.raises(ValueError, match="wandb_mode: online needs a W&B API key"):
        check_wandb_key("online")
    check_wandb_key("offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_wandb_key("online")


def test_wandb_failing_to_start_is_one_line(monkeypatch, no_wandb_key, tiny_dirs, tmp_path, capsys):
    import wandb

    def rejected(*args, **kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb, "init", rejected)
    assert main(train_args(tiny_dirs["gemma2"], tmp_path, "--wandb-mode", "online")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: wandb_mode: W&B could not start in online mode (api_key")
    assert "--wandb-mode offline" in err and "Traceback" not in err


# ---------------------------------------------------------------------- 3. user errors: a line, no traceback
def run_cli(*args, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "MTC_DEBUG"))}
    full_env.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "mtc", *args], env=full_env, capture_output=True, text=True,
                          timeout=120, cwd=REPO, stdin=subprocess.DEVNULL)


def test_a_user_error_is_one_line_without_traceback_unless_debugging(tiny_dirs, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"content": "some text here"}\n')
    args = train_args(tiny_dirs["gemma2"], tmp_path / "out", "--dataset", str(data))
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: dataset {data} has no column 'text' (columns: ['content']); set text_column to the "
                     f"one holding the text"]
    debug = run_cli(*args, MTC_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "no column 'text'" in debug.stderr


# ---------------------------------------------------------------------- 4. two runs in one run dir
HOLDER = """
import sys, time
from mtc import lock
lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_a_busy_run_dir_is_refused_and_the_lock_dies_with_its_process(model_loads, tiny_dirs,
                                                                                       tmp_path, capsys):
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_args(tiny_dirs["gemma2"], tmp_path)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: run dir {run_dir} is in use by another training process (pid {holder.pid})")
        assert "--run-name" in err and model_loads == []
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(train_args(tiny_dirs["gemma2"], tmp_path, steps=10)) == 0  # the OS released the lock
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_a_file_system_without_locks_only_warns(monkeypatch, tmp_path, capsys):
    import fcntl

    from mtc import lock

    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with lock.hold([tmp_path / "r"]):
        assert "note: cannot lock the run dir" in capsys.readouterr().err
    assert lock._held == {}


def test_the_lock_is_reentrant_within_a_process_and_released_after(tmp_path):
    from mtc import lock

    with lock.hold([tmp_path / "r"]):
        with lock.hold([tmp_path / "r"]):
            pass
        assert str((tmp_path / "r").resolve()) in lock._held
    assert lock._held == {}


# ---------------------------------------------------------------------- 5. disk full
def test_disk_full_names_the_path_and_space_keeps_the_last_checkpoint_and_cleans_up(monkeypatch, tiny_dirs,
                                                                                    tmp_path, capsys):
    real_save, real_usage = torch.save, shutil.disk_usage

    def full_disk_save(obj, path, *args, **kwargs):
        if "step_20" in str(path):  # what torch's zip writer raises when the disk fills up mid-write
            Path(path).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(mtc.checkpoint.torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    assert main(train_args(tiny_dirs["gemma2"], tmp_path, steps=30)) == 1
    err = capsys.readouterr().err
    checkpoints = tmp_path / "r" / "checkpoints"
    assert f"error: disk full: could not write checkpoint step_20 to {checkpoints} (needs about " in err
    assert "kB, 1.0 kB free" in err and f"the last good checkpoint {checkpoints / 'step_10'} is kept" in err
    assert "Traceback" not in err
    assert [p.name for p in checkpoints.iterdir()] == ["step_10"]  # no .tmp-step_20 left behind
    load_checkpoint(checkpoints / "step_10")


def test_disk_full_while_writing_final_is_one_line_and_leaves_no_temporary(monkeypatch, tiny_dirs, tmp_path, capsys):
    from safetensors import SafetensorError

    real_save_file = mtc.checkpoint.save_file

    def full_disk_save_file(tensors, path, *args, **kwargs):
        if ".tmp-final" in str(path):  # what safetensors raises on ENOSPC
            Path(path).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(mtc.checkpoint, "save_file", full_disk_save_file)
    assert main(train_args(tiny_dirs["gemma2"], tmp_path, steps=10)) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: disk full (Error while serializing: I/O error: No space")
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".tmp")) == []
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_10"]


def test_a_full_mirror_only_warns_and_stale_mirror_temporaries_are_cleaned_at_start(monkeypatch, tiny_dirs,
                                                                                     tmp_path, capsys):
    drive = tmp_path / "drive"
    stale = [drive / "r" / "checkpoints" / ".tmp-step_40", drive / "r" / ".tmp-final",
             drive / "r" / "checkpoints" / ".trash-step_10", tmp_path / "out" / "r" / "checkpoints" / ".tmp-step_5"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    real_copytree = shutil.copytree

    def full_copytree(source, target, *args, **kwargs):
        if Path(source).name == "step_20":
            Path(target).mkdir(parents=True)
            (Path(target) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_copytree(source, target, *args, **kwargs)

    monkeypatch.setattr(mtc.checkpoint.shutil, "copytree", full_copytree)
    assert main(train_args(tiny_dirs["gemma2"], tmp_path / "out", "--drive-dir", str(drive), steps=30)) == 0
    err = capsys.readouterr().err
    assert f"warning: could not copy to the mirror {drive / 'r'} (its disk is full: " in err
    assert not any(folder.exists() for folder in stale)
    leftovers = [p for p in (drive / "r").rglob("*") if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == []
    assert [p.name for p in list_checkpoints(drive / "r")] == ["step_10", "step_30"]  # step_20 never arrived


# ---------------------------------------------------------------------- 6. a shrunk budget
def test_shrinking_the_budget_below_the_checkpoint_is_refused_and_final_is_kept(model_loads, trained_run, tiny_dirs,
                                                                               tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    final_before = (out / "r" / "final" / "model.safetensors").read_bytes()
    assert main(train_args(tiny_dirs["gemma2"], out, steps=15)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: total_tokens: 480 tokens make 15 steps, but checkpoint ")
    assert "is at step 30" in err and "--total-tokens to at least 960" in err
    assert model_loads == []
    assert (out / "r" / "final" / "model.safetensors").read_bytes() == final_before
    assert (out / "r" / "final" / "config.json").read_text() == (trained_run / "final" / "config.json").read_text()


def test_the_trainer_refuses_a_shrunk_budget_too(trained_run, tmp_path):
    from mtc.train import Trainer

    cfg = load_checkpoint(trained_run / "checkpoints" / "step_30")[0].cfg
    cfg = cfg.replace(output_dir=str(copy_run(trained_run, tmp_path)), total_tokens=32 * 25)
    with pytest.raises(ValueError, match="total_tokens: 800 tokens make 25 steps, but checkpoint .* is at step 30"):
        Trainer([cfg], store=None, progress=False)


# ---------------------------------------------------------------------- 7. config files, resume paths, network
def test_the_network_error_keeps_its_urls_whole(monkeypatch, tmp_path, capsys):
    from transformer_lens.model_bridge import TransformerBridge

    url = "https://huggingface.co/docs/transformers/installation#offline-mode"
    message = ("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
               f"cached files. Check your internet connection or see how to run the library in offline mode at "
               f"'{url}'.")

    def no_network(*args, **kwargs):
        raise OSError(message)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", no_network)
    args = train_args("google/gemma-2-2b", tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download google/gemma-2-2b: no network (") and url in err
    assert len(err.strip().splitlines()) == 1
    for filler in (150, 200):  # the cut falls before the URL, or where the URL would be cut in the middle
        long = explain_load_error("m", ConnectionError("no connection " * (filler // 14) + url + " then more"))
        assert "https://" not in long.replace(url, ""), long


# ---------------------------------------------------------------------- 8. an interrupted prune
class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_prune_killed_halfway_leaves_no_half_checkpoint_listed(monkeypatch, tiny_dirs, tmp_path):
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        path = Path(path)
        if path.name.endswith("step_10") and (path / "trainer_state.pt").exists():
            (path / "trainer_state.pt").unlink()  # the delete got this far
            raise Killed()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(mtc.checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(Killed):
        main(train_args(tiny_dirs["gemma2"], tmp_path, steps=30))  # step_10 is pruned when step_30 is written
    listed = list_checkpoints(tmp_path / "r")
    assert listed and all((p / "trainer_state.pt").is_file() for p in listed), [p.name for p in listed]
    monkeypatch.setattr(mtc.checkpoint.shutil, "rmtree", real_rmtree)
    assert main(train_args(tiny_dirs["gemma2"], tmp_path, steps=30)) == 0  # resumes and cleans the leftover
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_20", "step_30"]
    assert load_file(tmp_path / "r" / "final" / "model.safetensors")


def test_os_errors_are_described_by_file_and_fix():
    from mtc.errors import describe, exit_code

    denied = PermissionError(errno.EACCES, "Permission denied", "/data/runs/r/metrics.jsonl")
    assert describe(denied) == ("/data/runs/r/metrics.jsonl: Permission denied; no permission to write there; "
                                "choose a writable folder")
    assert exit_code(denied) == 2
    full = OSError(errno.ENOSPC, "No space left on device", "/data/runs/r/metrics.jsonl")
    assert describe(full).startswith("disk full (") and "--resume auto continues" in describe(full)
    assert exit_code(full) == 1
    assert describe(KeyError("dataset x has no column 'text'")) == "dataset x has no column 'text'"


# ---------------------------------------------------------------------- 9. divergence while finite
def test_a_run_diverging_while_finite_is_warned_about_and_exits_non_zero(tiny_dirs, tmp_path, capsys):
    # equal prefix weights: this trajectory stays above FVU 2 without a new best to the end (at lr 100 whether a late
    # interval happens to set a new best depends on every detail of the loss)
    args = train_args(tiny_dirs["gemma2"], tmp_path, "--lr", "100", "--min-lr", "100", "--warmup-steps", "0",
                      "--log-every", "2", "--prefix-weights", "1", "1", "1", "1", steps=20)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "r is diverging: FVU above 2 and not improving for 3 log intervals" in err
    assert "error: r diverged (FVU above 2" in err and "Traceback" not in err
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file(), "the weights are kept"
