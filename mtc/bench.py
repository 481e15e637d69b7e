"""Throughput benchmark: how close training runs to the limit set by the language model's forward pass.

    python -m mtc bench                                  # CPU: offline Gemma-3-270M with the demo preset
    python -m mtc bench --preset gemma2-2b-l17           # GPU: layer 17, 18,432 latents, k=96, batch 4096
    python -m mtc bench --preset gemma2-2b-l17 --random-weights   # the same shapes, no download
    python -m mtc bench --synthetic                      # the transcoder step alone, random activations
    python -m mtc bench --short                          # a quick run (CI)

One process, one device, four measurements:

- forward:  the bare forward pass up to the deepest hook (`stop_at_layer`, nothing cached), in language-model
            tokens/s: the limit of the pipeline;
- pipeline: the `Trainer` end to end (store refills, transcoder steps, activation samples, logging, the final
            checkpoint), in trained tokens/s (BOS positions are never trained on, so this counts ~1% fewer);
- step:     the transcoder's training step alone on stored activations, tokens/s and achieved FLOP/s;
- memory:   peak memory of each part (GPU: most bytes allocated; CPU: peak resident set of the process).

Ratios: pipeline / forward (1.0 means training is as fast as reading the activations) and step / forward
(how many times faster the transcoder trains than the model produces activations).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .config import TranscoderConfig, resolve_device
from .presets import PRESETS
from .transcoder import MatryoshkaTranscoder, TrainingOutput


@dataclass
class BenchSettings:
    """What to measure and how much of it."""

    preset: str = "demo"
    device: str = "cpu"
    parts: tuple[str, ...] = ("forward", "pipeline", "step")
    fills: int = 3  # buffer fills timed in `forward` and `pipeline`
    rounds: int = 2  # forward and pipeline alternate this many times; the best of each counts
    steps: int = 10  # timed transcoder steps in `step`
    dead_fraction: float = 0.5  # latents marked dead in `step`, so its AuxK costs what a mature run pays
    short: bool = False
    synthetic: bool = False
    random_weights: bool = False
    overrides: dict = field(default_factory=dict)  # TranscoderConfig fields


def bench_config(settings: BenchSettings, output_dir: Path) -> TranscoderConfig:
    """The preset's config, set up for measuring: no W&B, no mirror, one checkpoint at the end."""
    preset = dict(PRESETS[settings.preset])
    if settings.short:
        preset.update(buffer_tokens=4 * preset["batch_size"], model_batch_size=min(16, preset["model_batch_size"]))
    preset.update(settings.overrides)
    if settings.synthetic and not {"d_in", "d_out"} <= set(preset):
        from .memory import model_shape

        width = model_shape(preset["model_name"]).d_model  # its config only: no model is loaded
        preset.setdefault("d_in", width)
        preset.setdefault("d_out", width)
    batch_size = preset.get("batch_size", TranscoderConfig.batch_size)
    buffer_tokens = preset.get("buffer_tokens", TranscoderConfig.buffer_tokens)
    steps = max(1, settings.fills * (buffer_tokens // batch_size))
    preset.update(total_tokens=steps * batch_size, warmup_steps=min(preset.get("warmup_steps", 0), steps))
    return TranscoderConfig(**preset).replace(
        output_dir=str(output_dir), run_name="bench", drive_dir="none", wandb_mode="disabled", log_every=steps,
        checkpoint_every=steps, device=settings.device)


# ---------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- the parts
def measure_forward(bridge, contexts: torch.Tensor, model_batch_size: int, stop_at_layer: int,
                    device: torch.device) -> dict:
    """Language-model tokens/s of the bare forward pass over `contexts`, stopped after the deepest hook."""
    with torch.no_grad():
        bridge(contexts[:model_batch_size].to(device), stop_at_layer=stop_at_layer)  # warm-up
        reset_peak_memory(device)
        start = time.perf_counter()
        for first in range(0, len(contexts), model_batch_size):
            bridge(contexts[first:first + model_batch_size].to(device), stop_at_layer=stop_at_layer)
        synchronize(device)
    seconds = time.perf_counter() - start
    return {"tokens": contexts.numel(), "seconds": seconds, "tokens_per_s": contexts.numel() / seconds,
            "peak_memory_bytes": peak_memory_bytes(device)}


def measure_pipeline(cfg: TranscoderConfig, store, device: torch.device) -> dict:
    """Trained tokens/s of the `Trainer` over `cfg.total_steps` steps, its first fill included."""
    from .train import Trainer

    trainer = Trainer([cfg], store, device=device, resume="never", progress=False)
    reset_peak_memory(device)
    start = time.perf_counter()
    metrics = trainer.train()[0]
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = cfg.total_steps * cfg.batch_size
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": cfg.total_steps,
            "fvu": metrics["fvu"], "peak_memory_bytes": peak_memory_bytes(device)}


def step_flops(cfg: TranscoderConfig, out: TrainingOutput, n_aux: int) -> float:
    """Useful floating-point operations of one training step: the dense encoder forward; the encoder
    backward, decoder forward and backward over the active entries (BatchTopK and AuxK); the skip path."""
    n_active = len(out.active[0]) + n_aux
    flops = 2 * out.n_tokens * cfg.d_in * cfg.d_sae  # x @ W_enc
    flops += 2 * n_active * cfg.d_in  # sparse grad of W_enc
    flops += 3 * 2 * n_active * cfg.d_out  # decode, grad of W_dec, grad of the activations
    if cfg.skip_connection:
        flops += 2 * 2 * out.n_tokens * cfg.d_in * cfg.d_out
    return float(flops)


def measure_step(cfg: TranscoderConfig, x: torch.Tensor, y: torch.Tensor, steps: int, dead_fraction: float,
                 device: torch.device) -> dict:
    """Tokens/s and FLOP/s of the transcoder's training step alone on one batch of activations."""
    from .train import make_optimizer, train_step

    torch.manual_seed(cfg.seed)
    model = MatryoshkaTranscoder(cfg, device=device)
    optimizer = make_optimizer(model, cfg)
    x, y = x.to(device, model.W_enc.dtype), y.to(device, model.W_enc.dtype)
    model.init_from_batch(x, y)
    n_dead = int(dead_fraction * cfg.d_sae)
    dead = torch.randperm(cfg.d_sae, generator=torch.Generator().manual_seed(0))[:n_dead].to(device)

    def one_step() -> TrainingOutput:
        model.tokens_since_fired[dead] = cfg.dead_after_tokens  # keep the chosen latents dead
        return train_step(model, optimizer, x, y, lr=cfg.lr)

    for _ in range(2):  # warm-up: allocator, kernels, the first-step threshold
        one_step()
    synchronize(device)
    reset_peak_memory(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = one_step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    n_aux = len(x) * min(cfg.k_aux, n_dead)
    return {"tokens_per_s": len(x) / seconds, "ms_per_step": 1000 * seconds, "batch_size": len(x),
            "flop_per_s": step_flops(cfg, out, n_aux) / seconds, "dead_fraction": dead_fraction,
            "peak_memory_bytes": peak_memory_bytes(device)}


# ---------------------------------------------------------------------- orchestration
def load_bridge(cfg: TranscoderConfig, random_weights: bool, device: str):
    from .language_model import load_language_model
    from .random_model import random_language_model

    if random_weights:
        return random_language_model(cfg.model_name, device=device, dtype=cfg.model_dtype)
    return load_language_model(cfg.model_name, device=device, dtype=cfg.model_dtype)


def run_benchmark(settings: BenchSettings) -> dict:
    """Measure `settings.parts` and return the figures (JSON-ready), with the ratios."""
    from .activations import build_store
    from .language_model import fit_config_to_model, model_dtype_of

    device = torch.device(settings.device)
    with tempfile.TemporaryDirectory(prefix="mtc-bench-") as work:
        cfg = bench_config(settings, Path(work))
        report = {"preset": settings.preset, "device": describe_device(device), "threads": torch.get_num_threads(),
                  "rounds": settings.rounds,
                  "torch": torch.__version__, "short": settings.short, "synthetic": settings.synthetic,
                  "random_weights": settings.random_weights, "config": {}, "parts": {}}
        if settings.synthetic:
            generator = torch.Generator().manual_seed(cfg.seed)
            x = torch.randn(cfg.batch_size, cfg.d_in, generator=generator)
            y = torch.randn(cfg.batch_size, cfg.d_out, generator=generator)
            report["parts"]["step"] = measure_step(cfg, x, y, settings.steps, settings.dead_fraction, device)
        else:
            bridge = load_bridge(cfg, settings.random_weights, settings.device)
            cfg = fit_config_to_model(cfg, bridge).replace(model_dtype=model_dtype_of(bridge))  # what "auto" became
            if "step" in settings.parts:
                small = build_store(bridge, [cfg.replace(buffer_tokens=cfg.batch_size)], buffer_device=device)
                batch = small.next_batch()
                report["parts"]["step"] = measure_step(cfg, batch.sources[0], batch.targets[0], settings.steps,
                                                       settings.dead_fraction, device)
            if "forward" in settings.parts:
                reader = build_store(bridge, [cfg], buffer_device=device)  # its contexts and stop layer
                n_contexts = settings.fills * math.ceil(cfg.buffer_tokens / (cfg.seq_len - 1))
                contexts = torch.stack(list(itertools.islice(reader.make_contexts(), n_contexts)))
            # Alternate the two, so a busy moment of the machine does not land on one of them only.
            for round_index in range(settings.rounds):
                if "forward" in settings.parts:
                    keep_best(report["parts"], "forward", measure_forward(
                        bridge, contexts, cfg.model_batch_size, reader.stop_at_layer, device))
                if "pipeline" in settings.parts:
                    run_cfg = cfg.replace(run_name=f"bench-{round_index}")
                    store = build_store(bridge, [run_cfg], buffer_device=device)
                    keep_best(report["parts"], "pipeline", measure_pipeline(run_cfg, store, device))
        report["config"] = {name: getattr(cfg, name) for name in (
            "model_name", "source_hook", "target_hook", "d_in", "d_out", "d_sae", "prefix_sizes", "k", "k_aux",
            "batch_size", "buffer_tokens", "seq_len", "model_batch_size", "dtype", "compute_dtype", "model_dtype",
            "activation_dtype", "kernels")}
    report["ratios"] = ratios(report["parts"])
    return report


def keep_best(parts: dict, name: str, result: dict) -> None:
    if name not in parts or result["tokens_per_s"] > parts[name]["tokens_per_s"]:
        parts[name] = result


def ratios(parts: dict) -> dict:
    forward = parts.get("forward", {}).get("tokens_per_s")
    out = {}
    if forward and "pipeline" in parts:
        out["pipeline_over_forward"] = parts["pipeline"]["tokens_per_s"] / forward
    if forward and "step" in parts:
        out["step_over_forward"] = parts["step"]["tokens_per_s"] / forward
    return out


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(report: dict) -> str:
    """The figures as a Markdown table, plus the ratios."""
    cfg = report["config"]
    lines = [f"mtc bench: preset {report['preset']} on {report['device']}, torch {report['torch']}"
             + (" (short)" if report["short"] else "") + (" (random weights)" if report["random_weights"] else "")
             + f", best of {report['rounds']} alternating rounds",
             f"{cfg['model_name']} {cfg['source_hook']} -> {cfg['target_hook']}; d_in={cfg['d_in']} "
             f"d_sae={cfg['d_sae']} k={cfg['k']} batch={cfg['batch_size']} kernels={cfg['kernels']} "
             f"compute={cfg['compute_dtype'] or cfg['dtype']} model={cfg['model_dtype']}", "",
             "| part | tokens/s | detail | peak memory |", "| --- | ---: | --- | ---: |"]
    parts = report["parts"]
    if "forward" in parts:
        p = parts["forward"]
        lines.append(f"| forward (to deepest hook) | {p['tokens_per_s']:,.0f} | {p['tokens']:,} LM tokens in "
                     f"{p['seconds']:.1f} s | {p['peak_memory_bytes'] / 2**30:.2f} GiB |")
    if "pipeline" in parts:
        p = parts["pipeline"]
        lines.append(f"| pipeline (store + training) | {p['tokens_per_s']:,.0f} | {p['steps']} steps, "
                     f"{p['tokens']:,} tokens in {p['seconds']:.1f} s | {p['peak_memory_bytes'] / 2**30:.2f} GiB |")
    if "step" in parts:
        p = parts["step"]
        lines.append(f"| transcoder step alone | {p['tokens_per_s']:,.0f} | {p['ms_per_step']:.1f} ms/step, "
                     f"{p['flop_per_s'] / 1e12:.2f} TFLOP/s, {100 * p['dead_fraction']:.0f}% dead (AuxK) | "
                     f"{p['peak_memory_bytes'] / 2**30:.2f} GiB |")
    for name, value in report["ratios"].items():
        lines.append(f"\n{name.replace('_', ' ')}: {value:.3f}")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())


# ---------------------------------------------------------------------- command line
def bench_command(args: argparse.Namespace) -> int:
    """`python -m mtc bench ...`: the throughput benchmark, or with `--quality` the quality benchmark."""
    device = resolve_device(args.device)
    preset = args.preset or ("gemma2-2b-l17" if device == "cuda" and not args.quality else "demo")
    if args.quality:
        return quality_command(args, preset, device)
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    unknown = set(parts) - {"forward", "pipeline", "step"}
    if unknown or not parts:
        raise ValueError(f"--parts: unknown part(s) {sorted(unknown)}; choose from forward, pipeline, step")
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = config_overrides(args)
    if args.random_weights:
        overrides.setdefault("dataset", "pydoc")  # the text does not matter for throughput
    settings = BenchSettings(preset=preset, device=device, parts=("step",) if args.synthetic else parts,
                             fills=1 if args.short else args.fills, steps=3 if args.short else args.steps,
                             rounds=1 if args.short else args.rounds,
                             dead_fraction=args.dead_fraction, short=args.short, synthetic=args.synthetic,
                             random_weights=args.random_weights, overrides=overrides)
    report = run_benchmark(settings)
    print(format_report(report))
    write_report(report, Path(args.json))
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def config_overrides(args: argparse.Namespace) -> dict:
    """The `TranscoderConfig` fields set on a bench command line (its `--device` is the bench's own)."""
    return {f.name: getattr(args, f.name) for f in fields(TranscoderConfig)
            if f.name != "device" and hasattr(args, f.name)}


def quality_command(args: argparse.Namespace, preset: str, device: str) -> int:
    from .checkpoint import atomic_write_bytes
    from .language_model import resolve_model_dtype
    from .presets import PRESETS
    from .quality import (ActivationCache, check_sparsify_python, collect_cache, format_quality, run_quality,
                          run_sparsify)

    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = config_overrides(args)
    settings = {**PRESETS[preset], "wandb_mode": "disabled", "drive_dir": "none", "samples_every": 0,
                "output_dir": "runs/quality", **overrides}
    cfg = TranscoderConfig.from_dict(settings)
    cache_path = Path(args.cache or Path(cfg.output_dir) / f"{preset}-cache.safetensors")
    if args.sparsify_python:
        check_sparsify_python(args.sparsify_python)
    if cache_path.is_file():
        cache = ActivationCache.load(cache_path)
        made_in = cache.meta.get("model_dtype", "float32")  # caches older than the key came from float32 models
        wanted = resolve_model_dtype(cfg.model_dtype, device)
        if made_in != wanted:
            print(f"note: {cache_path} holds activations of the language model in {made_in}, model_dtype="
                  f"{cfg.model_dtype} asks for {wanted}; the cache is used as it is (delete it, or give another "
                  "--cache, to collect a new one)", file=sys.stderr)
    else:
        from .language_model import fit_config_to_model, load_language_model

        bridge = load_language_model(cfg.model_name, device=device, dtype=cfg.model_dtype)
        cfg = fit_config_to_model(cfg, bridge)
        cache = collect_cache(bridge, cfg, args.eval_tokens)
        cache.save(cache_path)
        print(f"wrote the activation cache {cache_path}", file=sys.stderr)
    cfg = cfg.replace(d_in=cache.train_source.shape[1], d_out=cache.train_target.shape[1])
    reports = run_quality(cfg, cache, device=device)
    if args.sparsify_python:
        reports["sparsify"] = run_sparsify(args.sparsify_python, cache_path, cfg)
    print(format_quality(reports))
    atomic_write_bytes(Path(args.json), (json.dumps(reports, indent=2) + "\n").encode())
    if not args.sparsify_python:
        print(f"\nwrote {args.json}; --sparsify-python VENV/bin/python adds EleutherAI sparsify on the same cache "
              "in the same units (benchmarks/quality_sparsify.py)", file=sys.stderr)
    return 0
