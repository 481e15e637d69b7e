"""Train a Matryoshka transcoder with one command, on Google Colab or any GPU machine.

    !python colab_train.py --layer 17

Checks the checkout (or clones it when this file was downloaded alone), installs the requirements in
Colab, picks dtypes for the GPU, trains through `python -m mtc train` and says where the results are.
Only the standard library is imported at the top: this file must run before anything is installed.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: mtc may not be importable yet
    from mtc.colab import GpuSettings

REQUIRED_MODULES = ("torch", "transformer_lens", "safetensors")
REPORTED_KEYS = ("run_dir", "mirror_dir")  # `key: <path>` lines printed by `mtc train`

NO_GPU_WARNING = """\
##########################################################################################
#  NO GPU FOUND. NOT TRAINING.
#
#  Training a transcoder on Gemma-2-2B is NOT FEASIBLE ON A CPU: it would take weeks.
#  In Colab: Runtime > Change runtime type > pick a GPU (the free T4 works), then re-run.
#  To try the whole pipeline on this CPU anyway, add --allow-cpu: it runs the tiny
#  `demo` preset (a small model, minutes instead of weeks) instead of the real run.
##########################################################################################"""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own options, and the unknown arguments to pass on to `python -m mtc train`."""
    parser = argparse.ArgumentParser(
        prog="colab_train.py",
        description="Train a Matryoshka transcoder with one command (Google Colab or any GPU machine).",
        epilog="Any other arguments (e.g. --total-tokens 4000000) are passed on to `python -m mtc train`, "
               "after the ones this launcher sets, so they win. Example: python colab_train.py --layer 17",
        allow_abbrev=False,  # an abbreviation must not swallow a pass-through argument
    )
    parser.add_argument("--layer", type=int, help="Gemma-2-2B layer to train on (8, 12 or 17 map to presets)")
    parser.add_argument("--layers", metavar="all|A-B|A,B,C",
                        help="train a set, one transcoder per layer (for circuit-tracer); the memory plan decides "
                             "how many layers share a pass")
    parser.add_argument("--clt", action="store_true",
                        help="with --layers: one Matryoshka cross-layer transcoder over those layers (docs/clt.md)")
    parser.add_argument("--preset", help="named preset: demo, gemma2-2b-l8, gemma2-2b-l12, gemma2-2b-l17")
    parser.add_argument("--model", help="language model (default: the preset's)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, run the tiny CPU demo preset instead of refusing")
    parser.add_argument("--resume", default="auto", help="'auto' continues from the newest checkpoint (default)")
    parser.add_argument("--run-name", help="name of the run folder (default: chosen by the training CLI)")
    parser.add_argument("--output-dir", default="runs",
                        help="folder holding run folders, relative to the current directory (default: runs)")
    parser.add_argument("--drive-dir", default="auto",
                        help="checkpoint mirror: 'auto' (Google Drive in Colab), 'none', or a folder")
    parser.add_argument("--repo-url", default=os.environ.get("MTC_REPO_URL"),
                        help="git URL to clone when this file runs outside a checkout (default: $MTC_REPO_URL)")
    parser.add_argument("--no-install", action="store_true", help="never pip-install the requirements")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the settings and the training command, then stop")
    return parser.parse_known_args(argv)


# ---------------------------------------------------------------------- checkout
def is_checkout(folder: Path) -> bool:
    return (folder / "mtc" / "__init__.py").is_file() and (folder / "requirements.txt").is_file()


def ensure_checkout(args: argparse.Namespace, argv: list[str]) -> Path:
    """The repo root holding this script. Run as a lone file, clone (or reuse) `./mtc`, run the
    checkout's own copy of this script with the same arguments and exit with its status."""
    here = Path(__file__).resolve().parent
    if is_checkout(here):
        return here
    target = Path.cwd() / "mtc"
    if not is_checkout(target):
        if not args.repo_url:
            print(f"error: {here} is not an mtc checkout (no mtc/__init__.py and requirements.txt next to "
                  f"this script). Pass --repo-url <git URL> (or set MTC_REPO_URL) to clone it into ./mtc, "
                  f"or clone the repository yourself and run colab_train.py from it.", file=sys.stderr)
            raise SystemExit(2)
        if target.exists():
            print(f"error: {target} exists but is not an mtc checkout; move it away or run from another "
                  f"folder.", file=sys.stderr)
            raise SystemExit(2)
        print(f"cloning {args.repo_url} into {target}", flush=True)
        cloned = subprocess.run(["git", "clone", "--depth", "1", args.repo_url, str(target)])
        if cloned.returncode != 0 or not is_checkout(target):
            print(f"error: could not clone {args.repo_url} into {target}; check the URL.", file=sys.stderr)
            raise SystemExit(2)
    else:
        print(f"using the existing checkout {target}", flush=True)
    script = target / "colab_train.py"
    if not script.is_file():
        print(f"error: {target} has no colab_train.py; update it (git -C {target} pull).", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(exit_code(subprocess.run([sys.executable, str(script), *argv]).returncode))


# ---------------------------------------------------------------------- install
def missing_modules() -> list[str]:
    importlib.invalidate_caches()
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def maybe_install(args: argparse.Namespace, repo: Path, colab: ModuleType) -> None:
    """Install the requirements in Colab, or anywhere they are missing, unless --no-install.
    `colab` is the `mtc.colab` module."""
    missing = missing_modules()
    if not (colab.in_colab() or missing):
        return
    reason = f"missing: {', '.join(missing)}" if missing else "Colab"
    if args.no_install or args.dry_run:
        print(f"skipping the install of requirements.txt ({reason}) because of "
              f"{'--no-install' if args.no_install else '--dry-run'}", flush=True)
        return
    print(f"installing requirements.txt and mtc quietly ({reason}) ...", flush=True)
    try:
        colab.install_requirements(repo)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print("installed.", flush=True)


# ---------------------------------------------------------------------- GPU
def describe(gpu: GpuSettings) -> str:
    if gpu.device == "cpu":
        head = "device: cpu (no GPU visible)"
    else:
        memory = f"{gpu.memory_gb:.1f} GB" if gpu.memory_gb is not None else "memory unknown"
        head = f"device: {gpu.name} ({memory})"
    return (f"{head}\n  language-model dtype: {gpu.model_dtype}, activation dtype: {gpu.activation_dtype}"
            f"\n  {gpu.note}")


def check_gpu(args: argparse.Namespace, colab: ModuleType) -> GpuSettings:
    """The machine's `GpuSettings`, printed. Without a GPU, refuse (exit 3) unless --allow-cpu."""
    try:
        gpu = colab.gpu_settings()
    except ImportError as err:
        print(f"error: cannot inspect the GPU because {err.name} is not installed; drop --no-install or run "
              f"`pip install -r requirements.txt`.", file=sys.stderr)
        raise SystemExit(1) from None
    print(describe(gpu), flush=True)
    if gpu.device == "cpu":
        if not args.allow_cpu:
            print(NO_GPU_WARNING, file=sys.stderr, flush=True)
            raise SystemExit(3)
        asked = [f"--{name} {value}" for name, value in (("layer", args.layer), ("preset", args.preset))
                 if value is not None and value != "demo"]
        instead = f" instead of {' '.join(asked)}" if asked else ""
        print(f"--allow-cpu without a GPU: running the tiny CPU demo (--preset demo){instead}.", flush=True)
    return gpu


def check_drive(args: argparse.Namespace, colab: ModuleType) -> None:
    if colab.in_colab() and args.drive_dir.strip().lower() not in ("", "none") and not colab.drive_mounted():
        print(colab.DRIVE_MOUNT_HELP, flush=True)


# ---------------------------------------------------------------------- training
def build_train_command(args: argparse.Namespace, extra: list[str], gpu: GpuSettings) -> list[str]:
    """argv of `python -m mtc train` for these options on this machine."""
    command = [sys.executable, "-m", "mtc", "train"]
    if gpu.device == "cpu":
        command += ["--preset", "demo"]  # Gemma-2-2B is out of reach on a CPU
    else:
        if args.preset is not None:
            command += ["--preset", args.preset]
        if args.layer is not None:
            command += ["--layer", str(args.layer)]
    if args.layers is not None:
        command += ["--layers", args.layers] + (["--clt"] if args.clt else [])
    elif args.clt:
        raise SystemExit("error: --clt needs --layers (all, A-B or A,B,C): the layers the cross-layer transcoder spans")
    if args.model is not None:
        command += ["--model-name", args.model]
    command += ["--resume", args.resume]
    if args.run_name is not None:
        command += ["--run-name", args.run_name]
    # The child runs in the repo root; resolve here so --output-dir means what the user typed.
    command += ["--output-dir", str(Path(args.output_dir).expanduser().resolve())]
    command += ["--drive-dir", args.drive_dir, "--device", gpu.device]
    if gpu.device != "cpu":
        command += ["--model-dtype", gpu.model_dtype, "--activation-dtype", gpu.activation_dtype,
                    "--compute-dtype", gpu.compute_dtype]
    return command + list(extra)


def exit_code(returncode: int) -> int:
    """A shell-style exit status: a child killed by signal N gives 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_training(command: list[str], repo: Path) -> tuple[int, dict[str, str]]:
    """Run `command` in `repo`, streaming its output as it comes; returns the exit status and the
    paths it reported on `run_dir: <path>` and `mirror_dir: <path>` lines (the last of each)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Only stdout is piped (to spot the reported paths); stderr, where progress bars go, passes straight
    # through. Bytes are relayed as read, so carriage-return updates show without waiting for a newline.
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE)
    # An interrupt or SIGTERM sent to this launcher alone must reach the trainer, which then writes a
    # checkpoint and stops; relaying goes on until it has exited, so no orphan keeps training.
    def forward(signum: int, _frame) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, reported = "", {}
    try:
        while chunk := os.read(process.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            *lines, pending = (pending + decoder.decode(chunk)).split("\n")
            reported.update(reported_paths(lines))
        reported.update(reported_paths([pending]))
        return exit_code(process.wait()), reported
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        process.stdout.close()


def reported_paths(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        key, sep, value = line.strip("\r").partition(": ")
        if sep and key in REPORTED_KEYS and value.strip():
            found[key] = value.strip()
    return found


def locate_run_dir(printed: str | None, args: argparse.Namespace, repo: Path) -> Path | None:
    """The run folder: from the child's `run_dir:` line (relative to `repo`, where the child runs),
    else output_dir/run_name when named."""
    if printed:
        path = Path(printed).expanduser()
        return path if path.is_absolute() else repo / path
    if args.run_name:
        return Path(args.output_dir).expanduser().resolve() / args.run_name
    return None


def summary(run_dir: Path | None, mirror: Path | None) -> str:
    """Where the results are and what to do next."""
    if run_dir is None:
        return "training finished; the run folder is named in the output above."
    is_set = (run_dir / "set.json").is_file()
    run = shlex.quote(str(run_dir))
    lines = ["", "training finished.", f"  {'set' if is_set else 'run'} folder:   {run_dir}"]
    if mirror is not None:
        lines.append(f"  Drive mirror: {mirror}")
    if is_set:
        out = shlex.quote(str(run_dir.parent / f"{run_dir.name}-circuit-tracer"))
        return "\n".join(lines + [
            "next steps:",
            f"  for circuit-tracer: python -m mtc export circuit-tracer --run {run} --out {out} [--prefix 1]",
            f"  evaluate a layer:   python -m mtc eval --run {shlex.quote(str(run_dir / 'layer_0'))}",
            "  download the set as a zip (in a Colab cell):",
            f"    import shutil; from google.colab import files; "
            f"files.download(shutil.make_archive({str(run_dir)!r}, 'zip', {str(run_dir)!r}))"])
    lines += [
        "next steps:",
        f"  evaluate:        python -m mtc eval --run {run}",
        f"  inspect latents: python -m mtc samples --run {run} --latent 0",
        "  download (in a Colab cell):",
        f"    from google.colab import files; files.download({str(run_dir / 'final' / 'model.safetensors')!r})",
        "  or the whole run as a zip:",
        f"    import shutil; from google.colab import files; "
        f"files.download(shutil.make_archive({str(run_dir)!r}, 'zip', {str(run_dir)!r}))",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    repo = ensure_checkout(args, argv)
    from mtc import colab  # importable now: `repo` holds this script, so it is first on sys.path

    maybe_install(args, repo, colab)
    gpu = check_gpu(args, colab)
    check_drive(args, colab)
    command = build_train_command(args, extra, gpu)
    print(f"training command (in {repo}):\n  {shlex.join(command)}", flush=True)
    if args.dry_run:
        if args.layers is not None:  # the set's or CLT's memory plan, from the shapes alone (nothing is loaded)
            status, _ = run_training([*command, "--dry-run"], repo)
            if status != 0:
                return status
        print("dry run: not training.")
        return 0

    status, reported = run_training(command, repo)
    run_dir = locate_run_dir(reported.get("run_dir"), args, repo)
    if status != 0:
        where = f" in {run_dir}" if run_dir else ""
        print(f"\ntraining stopped (exit {status}). Checkpoints written so far are kept{where}; re-run the same "
              f"command (--resume auto) to continue from the newest one.", file=sys.stderr)
        return status
    if "mirror_dir" in reported:
        mirror = Path(reported["mirror_dir"])
    else:
        mirror = colab.resolve_mirror_dir(args.drive_dir, run_dir.name) if run_dir else None
    print(summary(run_dir, mirror))
    return 0


if __name__ == "__main__":
    sys.exit(main())
