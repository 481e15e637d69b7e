"""Memory plan of a transcoder set: how many layers fit in one pass of the language model on a device.

Training a set keeps, per layer, the transcoder's parameters, their gradients and Adam state, and an
activation buffer for each of its two hooks; once per pass, the language model's weights and working
set, and the working set of one transcoder step (layers step one after another). `memory_plan` adds
these up from the shapes alone, before anything is loaded, and splits the layers into as many passes as
the device needs. Every figure is an estimate from sizes and dtypes, with a tenth of the device kept
free for the allocator and the CUDA context.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .config import TranscoderConfig
from .language_model import HUB_MODELS, resolve_model_path
from .parallel import split

GiB = 2**30
HEADROOM = 0.9  # share of the device a plan may fill
# Planning CPU RAM, the process itself counts too: Python with torch, transformers and transformer-lens imported
# holds 0.47 GiB (measured with torch 2.13). On a GPU the headroom covers the CUDA context.
LIBRARIES_ON_CPU = GiB // 2
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
               "auto": 4}  # model_dtype "auto" is bfloat16 or float32: plan for the larger
# Memory of the devices researchers train on, for `--memory t4` and the docs (what torch reports).
NAMED_DEVICES = {"t4": 15.0, "l4": 22.5, "a100-40gb": 40.0, "a100-80gb": 80.0, "h100": 80.0}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a language model."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_params: int

    @classmethod
    def from_hf_config(cls, config: dict, n_params: int | None = None) -> ModelShape:
        """From a Hugging Face `config.json` (Gemma, Llama, GPT-2 naming). Without `n_params`, the count of
        a decoder with tied embeddings: embeddings + attention + gated MLP per layer."""
        config = config.get("text_config", config)
        d_model = config.get("hidden_size", config.get("n_embd"))
        n_layers = config.get("num_hidden_layers", config.get("n_layer"))
        n_heads = config.get("num_attention_heads", config.get("n_head"))
        if not (d_model and n_layers and n_heads):
            raise ValueError("config.json lacks hidden_size / num_hidden_layers / num_attention_heads; "
                             "cannot plan memory for this model")
        d_mlp = config.get("intermediate_size") or config.get("n_inner") or 4 * d_model
        n_kv = config.get("num_key_value_heads") or n_heads
        head_dim = config.get("head_dim") or d_model // n_heads
        vocab = config.get("vocab_size", 0)
        if n_params is None:
            attention = d_model * head_dim * (2 * n_heads + 2 * n_kv)
            n_params = vocab * d_model + n_layers * (attention + 3 * d_model * d_mlp + 4 * d_model) + d_model
        return cls(n_layers, d_model, d_mlp, n_heads, n_kv, head_dim, vocab, n_params)


def model_shape(name: str) -> ModelShape:
    """The shape of `name`, with no weights loaded: a hub model of `language_model.HUB_MODELS` (no download),
    a local folder (`config.json`, and the exact parameter count from its safetensors headers), or a hub id
    whose `config.json` can be fetched."""
    if name in HUB_MODELS:
        return ModelShape.from_hf_config(HUB_MODELS[name])
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return ModelShape.from_hf_config(json.loads((path / "config.json").read_text()), _count_parameters(path))
    try:
        from transformers import AutoConfig

        return ModelShape.from_hf_config(AutoConfig.from_pretrained(name).to_dict())
    except Exception as err:
        raise RuntimeError(f"model_name: cannot read the config of {name!r} to plan memory ({type(err).__name__}: "
                           f"{err}); check the name and network access, or pass a local model folder") from err


def _count_parameters(folder: Path) -> int | None:
    """Parameters in a folder's safetensors files, read from their headers (no tensor is loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def device_capacity(device: str, memory: str | None = None) -> tuple[str, int]:
    """(description, bytes) of the memory a set may plan with: `memory` names a device (`t4`, `a100-40gb`,
    ...) or gives GB; otherwise the CUDA device's total memory, or the CPU's available RAM."""
    if memory:
        key = memory.lower()
        if key in NAMED_DEVICES:
            return f"{memory} ({NAMED_DEVICES[key]:g} GiB)", int(NAMED_DEVICES[key] * GiB)
        try:
            gb = float(key.removesuffix("gb").removesuffix("gib"))
        except ValueError:
            gb = -1.0
        if not gb > 0:
            raise ValueError(f"--memory {memory!r}: give a size in GB (e.g. 15) or one of {', '.join(NAMED_DEVICES)}")
        return f"{gb:g} GiB (--memory)", int(gb * GiB)
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / GiB:.1f} GiB)", props.total_memory
    available = _available_ram()
    return f"CPU RAM ({available / GiB:.1f} GiB available)", available


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------- the plan
def transcoder_parameters(cfg: TranscoderConfig) -> int:
    return (cfg.d_in * cfg.d_sae + cfg.d_sae * cfg.d_out + cfg.d_sae + cfg.d_out
            + (cfg.d_in * cfg.d_out if cfg.skip_connection else 0))


def layer_costs(cfg: TranscoderConfig, shape: ModelShape) -> dict[str, int]:
    """Bytes one layer of the set keeps for the whole pass."""
    param_bytes = transcoder_parameters(cfg) * DTYPE_BYTES[cfg.dtype]
    buffers = 2 if cfg.prefetch else 1
    buffer = buffers * (cfg.buffer_tokens + cfg.seq_len) * DTYPE_BYTES[cfg.activation_dtype]
    chunk = cfg.model_batch_size * cfg.seq_len * DTYPE_BYTES[cfg.model_dtype]  # one forward's output per hook
    samples = cfg.d_sae * (cfg.samples_top_n + 4) * 24 if cfg.samples_every else 0
    # the JumpReLU calibration holds its batches at once at the end of the run (see Trainer._calibrate_thresholds)
    calibration = 0 if cfg.calibration_tokens == 0 else cfg.batch_size * min(
        -(-cfg.calibration_tokens // cfg.batch_size), max(1, cfg.total_steps // 10))
    return {"transcoder parameters": param_bytes, "gradients": param_bytes, "Adam state": 2 * param_bytes,
            f"activation buffer, source hook ({cfg.d_in} wide)": buffer * cfg.d_in,
            f"activation buffer, target hook ({cfg.d_out} wide)": buffer * cfg.d_out,
            "forward outputs of both hooks": chunk * (cfg.d_in + cfg.d_out),
            "calibration batches (end of run)": calibration * (cfg.d_in + cfg.d_out) * DTYPE_BYTES[cfg.activation_dtype],
            "firing counters and samples": cfg.d_sae * 8 + samples}


def pass_costs(cfg: TranscoderConfig, shape: ModelShape, on_cpu: bool = False) -> dict[str, int]:
    """Bytes needed once per pass, whatever the number of layers in it (`on_cpu`: the process's own too)."""
    model_bytes = DTYPE_BYTES[cfg.model_dtype]
    tokens = cfg.model_batch_size * cfg.seq_len
    forward = model_bytes * (tokens * (4 * shape.d_model + 3 * shape.d_mlp)
                             + 2 * cfg.model_batch_size * shape.n_heads * cfg.seq_len ** 2)
    compute = DTYPE_BYTES[cfg.compute_dtype or cfg.dtype]
    # pre-activations, their gradient and AuxK's candidates; per-prefix reconstructions and their gradients
    step = cfg.batch_size * (3 * cfg.d_sae * max(compute, 4) + (2 * cfg.n_prefixes + 4) * (cfg.d_in + cfg.d_out) * 4)
    costs = {"language model weights": shape.n_params * model_bytes, "language model forward": forward,
             "transcoder step (one layer at a time)": step}
    if on_cpu:
        costs["Python, torch and libraries"] = LIBRARIES_ON_CPU
    return costs


@dataclass
class MemoryPlan:
    device: str
    capacity: int
    per_pass: dict[str, int]
    per_layer: dict[str, int]
    layers: list[int]
    passes: list[list[int]]
    hint: str = "lower --buffer-tokens"  # how to need less per layer
    ranks: int = 1  # devices sharing each pass (layer-parallel)

    @property
    def usable(self) -> int:
        return int(self.capacity * HEADROOM)

    @property
    def layers_per_pass(self) -> int:
        """On one device."""
        return max(len(share) for p in self.passes for share in split(p, self.ranks))

    def format(self) -> str:
        rows = [f"memory plan on {self.device}; {len(self.layers)} layers, {HEADROOM:.0%} of the device usable "
                f"({_size(self.usable)})", "  once per pass:"]
        rows += [f"    {name:<44} {_size(size):>11}" for name, size in self.per_pass.items()]
        rows.append("  per layer:")
        rows += [f"    {name:<44} {_size(size):>11}" for name, size in self.per_layer.items()]
        per_layer, fixed = sum(self.per_layer.values()), sum(self.per_pass.values())
        rows.append(f"  {len(self.passes)} pass(es) of up to {self.layers_per_pass} layers"
                    + (f" per device, {self.ranks} devices (layer-parallel)" if self.ranks > 1 else "") + ": "
                    f"{_size(fixed + self.layers_per_pass * per_layer)} at most "
                    f"({_size(fixed)} + {self.layers_per_pass} x {_size(per_layer)})")
        rows.append("    layers by pass: " + " | ".join(describe_layers(p) for p in self.passes))
        if len(self.passes) > 1:
            buffer = sum(size for name, size in self.per_layer.items() if name.startswith("activation buffer"))
            rows.append(f"  fewer passes need less per layer: the activation buffers are {_size(buffer)} of its "
                        f"{_size(per_layer)} ({self.hint})")
        return "\n".join(rows)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def describe_layers(layers: list[int]) -> str:
    """`0-8` for a contiguous run, else a comma list."""
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def memory_plan(cfg: TranscoderConfig, shape: ModelShape, layers: list[int], device: str,
                capacity: int, ranks: int = 1, on_cpu: bool = False) -> MemoryPlan:
    """Split `layers` (in order) into the fewest passes whose memory fits `capacity` bytes per device, as evenly
    as possible; with `ranks` devices (layer-parallel under torchrun) a pass holds `ranks` times the layers.
    Raises `ValueError` naming the settings to change when not even one layer fits."""
    cfg = cfg.replace(d_in=shape.d_model, d_out=shape.d_model) if cfg.d_in != shape.d_model else cfg
    per_pass, per_layer = pass_costs(cfg, shape, on_cpu), layer_costs(cfg, shape)
    room = int(capacity * HEADROOM) - sum(per_pass.values())
    fit = room // sum(per_layer.values())
    if fit < 1:
        need = sum(per_pass.values()) + sum(per_layer.values())
        buffers = sum(size for name, size in per_layer.items() if name.startswith("activation buffer"))
        raise ValueError(
            f"memory: one layer needs about {need / GiB:.2f} GiB with the language model, more than "
            f"{HEADROOM:.0%} of {device}. Lower buffer_tokens (now {cfg.buffer_tokens:,}; the buffers are "
            f"{buffers / GiB:.2f} GiB per layer), use activation_dtype bfloat16/float16 (now {cfg.activation_dtype}), "
            f"or a smaller d_sae / batch_size")
    passes = split(list(layers), math.ceil(len(layers) / (fit * ranks)))
    if ranks > 1 and min(len(p) for p in passes) < ranks:
        raise ValueError(f"layer-parallel: {len(layers)} layers in {len(passes)} pass(es) leave some of the {ranks} "
                         f"processes without a layer; use fewer processes (--nproc-per-node)")
    hint = "lower --buffer-tokens" + (", or --activation-dtype bfloat16" if cfg.activation_dtype == "float32" else "")
    return MemoryPlan(device, capacity, per_pass, per_layer, list(layers), passes, hint, ranks)
