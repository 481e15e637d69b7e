import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtc import colab
from mtc.colab import GpuSettings, settings_for

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "colab_train.py"


def load_launcher():
    spec = importlib.util.spec_from_file_location("colab_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(args, cwd=REPO, script=SCRIPT, **env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLAB_") and k != "MTC_REPO_URL"}
    env.update(CUDA_VISIBLE_DEVICES="", **env_changes)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def no_colab(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delenv("COLAB_GPU", raising=False)


A100 = settings_for("NVIDIA A100-SXM4-40GB", (8, 0), 40.0)
CPU = settings_for(None, None, None)


# ---------------------------------------------------------------------- dtype choice
def test_t4_runs_the_model_in_float16():
    gpu = settings_for("Tesla T4", (7, 5), 15.0)
    assert (gpu.device, gpu.model_dtype, gpu.activation_dtype) == ("cuda", "float16", "float16")
    assert not gpu.native_bf16 and gpu.compute_dtype == "float32"  # emulated bfloat16 would be slower
    assert gpu.compute_capability == (7, 5) and gpu.memory_gb == 15.0
    assert "finite" in gpu.note and "float32" in gpu.note and "\n" not in gpu.note


@pytest.mark.parametrize("name, capability", [("NVIDIA A100-SXM4-40GB", (8, 0)), ("NVIDIA L4", (8, 9)),
                                              ("NVIDIA H100 80GB HBM3", (9, 0))])
def test_ampere_and_newer_use_bfloat16(name, capability):
    gpu = settings_for(name, capability, 40.0)
    assert (gpu.device, gpu.model_dtype, gpu.activation_dtype, gpu.compute_dtype) == ("cuda", "bfloat16",
                                                                                      "bfloat16", "bfloat16")
    assert gpu.native_bf16 and gpu.name == name


def test_no_gpu_is_cpu_float32():
    assert (CPU.device, CPU.name, CPU.model_dtype, CPU.activation_dtype) == ("cpu", "cpu", "float32", "float32")
    assert CPU.compute_capability is None and CPU.memory_gb is None and not CPU.native_bf16


def test_gpu_settings_without_cuda_is_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert colab.gpu_settings() == CPU


# ---------------------------------------------------------------------- Colab and Drive
@pytest.mark.parametrize("var", ["COLAB_RELEASE_TAG", "COLAB_GPU"])
def test_in_colab_reads_the_environment(monkeypatch, var):
    no_colab(monkeypatch)
    assert not colab.in_colab()
    monkeypatch.setenv(var, "1")
    assert colab.in_colab()


def test_default_mirror_dir_needs_colab_and_a_mounted_drive(monkeypatch, tmp_path):
    drive = tmp_path / "MyDrive"
    no_colab(monkeypatch)
    drive.mkdir()
    assert colab.default_mirror_dir("run", root=drive) is None  # mounted, but not in Colab
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-1")
    assert colab.default_mirror_dir("run", root=drive) == drive / "mtc" / "run"
    drive.rmdir()
    assert not colab.drive_mounted(drive)
    assert colab.default_mirror_dir("run", root=drive) is None  # in Colab, Drive not mounted


def test_resolve_mirror_dir(monkeypatch, tmp_path):
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    monkeypatch.setattr(colab, "DRIVE_ROOT", drive)
    monkeypatch.setenv("COLAB_GPU", "1")
    assert colab.resolve_mirror_dir("auto", "l17") == drive / "mtc" / "l17"
    no_colab(monkeypatch)
    assert colab.resolve_mirror_dir("auto", "l17") is None
    assert colab.resolve_mirror_dir("none", "l17") is None
    assert colab.resolve_mirror_dir("", "l17") is None
    assert colab.resolve_mirror_dir(str(tmp_path / "backup"), "l17") == tmp_path / "backup" / "l17"


def test_drive_help_says_how_to_mount():
    assert "drive.mount('/content/drive')" in colab.DRIVE_MOUNT_HELP
    assert "resume" in colab.DRIVE_MOUNT_HELP


def test_colab_module_imports_no_torch():
    code = "import sys, mtc.colab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_install_requirements_runs_pip_and_reports_failures(monkeypatch, tmp_path):
    calls = []

    def fake_run(command, cwd, capture_output, text):
        calls.append((command, cwd))
        failed = "-e" in command
        return subprocess.CompletedProcess(command, 1 if failed else 0, "", "ERROR: boom" if failed else "")

    monkeypatch.setattr(colab.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="boom"):
        colab.install_requirements(tmp_path)
    assert [c[0][1:] for c in calls] == [["-m", "pip", "install", "-q", "-r", "requirements.txt"],
                                        ["-m", "pip", "install", "-q", "--no-deps", "-e", "."]]
    assert all(c[0][0] == sys.executable and c[1] == tmp_path for c in calls)


# ---------------------------------------------------------------------- the launcher
def test_help_works_without_gpu_or_torch():
    result = run_script(["--help"])
    assert result.returncode == 0, result.stderr
    assert "--layer" in result.stdout and "--allow-cpu" in result.stdout
    # argument parsing must not need torch: it may not be installed yet
    code = ("import runpy, sys; sys.argv = ['colab_train.py', '--help']\n"
            "try: runpy.run_path('colab_train.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("torch imported: False")


def test_no_gpu_without_allow_cpu_refuses_loudly():
    result = run_script(["--layer", "17", "--no-install"])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "NO GPU" in result.stderr and "--allow-cpu" in result.stderr
    assert "Change runtime type" in result.stderr
    assert "training command" not in result.stdout


def test_dry_run_on_cpu_prints_the_demo_command(tmp_path):
    result = run_script(["--layer", "17", "--allow-cpu", "--dry-run", "--no-install", "--run-name", "x",
                         "--output-dir", str(tmp_path), "--total-tokens", "1000"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-m mtc train --preset demo" in result.stdout
    assert "--device cpu" in result.stdout and "--total-tokens 1000" in result.stdout
    assert "instead of --layer 17" in result.stdout
    assert "dry run" in result.stdout
    assert not (tmp_path / "x").exists()


def test_build_train_command_on_cpu_forces_the_demo():
    launcher = load_launcher()
    args, extra = launcher.parse_args(["--layer", "17", "--allow-cpu"])
    command = launcher.build_train_command(args, extra, CPU)
    assert command[:4] == [sys.executable, "-m", "mtc", "train"]
    text = " ".join(command[1:])
    assert "--preset demo" in text and "--device cpu" in text
    assert "--layer" not in text and "dtype" not in text


def test_build_train_command_on_a100_passes_layer_dtypes_and_extras(tmp_path):
    launcher = load_launcher()
    args, extra = launcher.parse_args(["--layer", "17", "--run-name", "l17", "--output-dir", str(tmp_path),
                                       "--model", "google/gemma-2-2b", "--total-tokens", "4000000", "--lr=1e-4"])
    assert extra == ["--total-tokens", "4000000", "--lr=1e-4"]
    command = launcher.build_train_command(args, extra, A100)
    text = " ".join(command[1:])
    for part in ("--layer 17", "--model-name google/gemma-2-2b", "--resume auto", "--run-name l17",
                 f"--output-dir {tmp_path}", "--drive-dir auto", "--device cuda", "--model-dtype bfloat16",
                 "--activation-dtype bfloat16", "--compute-dtype bfloat16"):
        assert part in text, part
    assert "--preset" not in text
    assert command[-3:] == extra  # last, so the user's own flags win


def test_build_train_command_passes_a_clt_over_layers():
    launcher = load_launcher()
    args, extra = launcher.parse_args(["--layers", "all", "--clt", "--d-sae", "2048"])
    text = " ".join(launcher.build_train_command(args, extra, A100)[1:])
    assert "--layers all --clt" in text and text.endswith("--d-sae 2048")
    args, extra = launcher.parse_args(["--clt"])
    with pytest.raises(SystemExit, match="--clt needs --layers"):
        launcher.build_train_command(args, extra, A100)


def test_run_training_streams_output_and_finds_the_run_dir(tmp_path, capfd):
    launcher = load_launcher()
    code = ("print('step 1'); print('run_dir: runs/old'); print('run_dir: runs/abc'); "
            "print('mirror_dir: /drive/abc'); print('x run_dir: no')")
    status, reported = launcher.run_training([sys.executable, "-c", code], tmp_path)
    assert (status, reported) == (0, {"run_dir": "runs/abc", "mirror_dir": "/drive/abc"})
    assert "step 1" in capfd.readouterr().out
    args, _ = launcher.parse_args([])
    assert launcher.locate_run_dir(reported["run_dir"], args, tmp_path) == tmp_path / "runs" / "abc"
    status, reported = launcher.run_training([sys.executable, "-c", "import sys; sys.exit(5)"], tmp_path)
    assert (status, reported) == (5, {})


def test_run_training_forwards_sigterm_to_the_trainer(tmp_path):
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda s, f: (print('child got', s, flush=True), sys.exit(143)))\n"
             "print('ready', flush=True); time.sleep(30); sys.exit(0)\n")
    wrapper = (f"import importlib.util, sys\n"
               f"spec = importlib.util.spec_from_file_location('colab_train', {str(SCRIPT)!r})\n"
               f"launcher = importlib.util.module_from_spec(spec); spec.loader.exec_module(launcher)\n"
               f"status, _ = launcher.run_training([sys.executable, '-c', {child!r}], {str(tmp_path)!r})\n"
               f"print('launcher status', status, flush=True)\n")
    process = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.terminate()
    out, _ = process.communicate(timeout=30)
    assert "child got 15" in out and "launcher status 143" in out


def test_summary_names_the_next_steps(tmp_path):
    text = load_launcher().summary(tmp_path / "run", tmp_path / "drive" / "run")
    assert f"python -m mtc eval --run {tmp_path / 'run'}" in text
    assert "python -m mtc samples --run" in text and "--latent 0" in text
    assert "files.download" in text and "final/model.safetensors" in text and "make_archive" in text
    assert str(tmp_path / "drive" / "run") in text


def test_lone_file_without_repo_url_exits_2(tmp_path):
    lone = tmp_path / "colab_train.py"
    shutil.copy(SCRIPT, lone)
    result = run_script(["--layer", "17"], cwd=tmp_path, script=lone)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--repo-url" in result.stderr
    assert not (tmp_path / "mtc").exists()


def fake_checkout(folder: Path) -> None:
    """A stand-in repo whose colab_train.py reports the arguments it got."""
    (folder / "mtc").mkdir(parents=True)
    (folder / "mtc" / "__init__.py").write_text("")
    (folder / "requirements.txt").write_text("")
    (folder / "colab_train.py").write_text("import sys; print('checkout got', sys.argv[1:]); sys.exit(7)\n")


def test_lone_file_reuses_an_existing_checkout(tmp_path):
    lone = tmp_path / "colab_train.py"
    shutil.copy(SCRIPT, lone)
    fake_checkout(tmp_path / "mtc")
    result = run_script(["--layer", "17", "--total-tokens", "10"], cwd=tmp_path, script=lone)
    assert result.returncode == 7, result.stdout + result.stderr
    assert "checkout got ['--layer', '17', '--total-tokens', '10']" in result.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_lone_file_clones_the_repo_url(tmp_path):
    source = tmp_path / "source"
    fake_checkout(source)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(source)]
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    work = tmp_path / "work"
    work.mkdir()
    lone = work / "colab_train.py"
    shutil.copy(SCRIPT, lone)
    result = run_script(["--preset", "demo", "--repo-url", f"file://{source}"], cwd=work, script=lone)
    assert result.returncode == 7, result.stdout + result.stderr
    assert (work / "mtc" / "mtc" / "__init__.py").is_file()
    assert "checkout got ['--preset', 'demo', '--repo-url'" in result.stdout


def test_launcher_fakes_an_a100_end_to_end(monkeypatch, tmp_path, capsys):
    launcher = load_launcher()
    no_colab(monkeypatch)
    monkeypatch.setattr(colab, "gpu_settings", lambda: A100)
    monkeypatch.setattr(launcher, "missing_modules", lambda: [])
    seen = {}

    def fake_training(command, repo):
        seen["command"] = command
        return 0, {"run_dir": str(tmp_path / "runs" / "gemma2-2b-l17")}

    monkeypatch.setattr(launcher, "run_training", fake_training)
    assert launcher.main(["--layer", "17", "--drive-dir", "none"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA A100" in out and "bfloat16" in out
    assert "--model-dtype bfloat16" in " ".join(seen["command"])
    assert f"python -m mtc eval --run {tmp_path / 'runs' / 'gemma2-2b-l17'}" in out


def test_launcher_reports_a_failed_run(monkeypatch, capsys):
    launcher = load_launcher()
    no_colab(monkeypatch)
    monkeypatch.setattr(colab, "gpu_settings", lambda: A100)
    monkeypatch.setattr(launcher, "missing_modules", lambda: [])
    monkeypatch.setattr(launcher, "run_training", lambda command, repo: (1, {}))
    assert launcher.main(["--layer", "17", "--run-name", "l17"]) == 1
    err = capsys.readouterr().err
    assert "--resume auto" in err and "l17" in err
