"""The one settings object of a run: `TranscoderConfig`.

Every setting lives here, is validated at construction (before any model or data is loaded) and
round-trips through JSON losslessly, so `config.json` in a run dir is enough to rebuild the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
WANDB_MODES = ("auto", "online", "offline", "disabled")
NORMALIZATIONS = ("mean_norm", "none")
PYDOC_TOKEN_LIMIT = 2_000_000  # generous: tokenizers differ, the corpus is ~0.5M Gemma tokens


def torch_dtype(name: str):
    """Map a dtype name of the config ("float32", "bfloat16", ...) to a `torch.dtype`."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def resolve_device(device: str) -> str:
    """The device a config's `device` means: \"auto\" is cuda when torch sees a GPU, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _dtype_name(value: Any) -> Any:
    """Accept `torch.float32` as well as "float32" (and "torch.float32") and store the name."""
    text = str(value)
    return text.removeprefix("torch.") if text.removeprefix("torch.") in DTYPE_NAMES else value


@dataclass
class TranscoderConfig:
    """Settings of one Matryoshka transcoder run.

    Sizes: the transcoder maps `d_in`-wide activations at `source_hook` to `d_out`-wide activations
    at `target_hook` through `d_sae` latents. `prefix_sizes` are cumulative (`m_1 < ... < m_G = d_sae`);
    `prefix_sizes=[d_sae]` is a plain BatchTopK transcoder. Leave `prefix_sizes` empty to get
    `[d_sae]`.
    """

    # --- language model and hooks
    model_name: str = "google/gemma-2-2b"
    source_hook: str = "blocks.12.ln2.hook_normalized"
    target_hook: str = "blocks.12.hook_mlp_out"

    # --- transcoder architecture
    d_in: int = 2304
    d_out: int = 2304
    d_sae: int = 18432
    prefix_sizes: list[int] = field(default_factory=list)
    prefix_weights: list[float] | None = None
    k: int = 96
    skip_connection: bool = False
    kernels: str = "sparse"  # training maths: "sparse" (gradients touch selected entries only) or "dense" (reference)

    # divide each hook's activations by a power of two bringing its mean norm near sqrt(d) (see mtc/scaling.py);
    # saved models always work on raw activations
    normalize_activations: str = "mean_norm"

    # --- sparsity machinery
    k_aux: int = 512
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 10_000_000
    threshold_momentum: float = 0.99
    calibration_tokens: int = 32_768  # tokens read after training (at most a tenth of the run's) to set the JumpReLU threshold so L0 = k; 0 keeps the moving average

    # --- optimisation
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0

    # --- batches and budget
    batch_size: int = 4096  # token activations per optimiser step
    total_tokens: int = 16_000_000
    seq_len: int = 128  # tokens per packed context fed to the language model
    model_batch_size: int = 32  # contexts per language-model forward pass
    buffer_tokens: int = 262_144  # activations mixed in the shuffling buffer
    prefetch: bool = False  # compute the next buffer fill in the background (holds two buffers; see docs)

    # --- data
    dataset: str = "HuggingFaceFW/fineweb-edu"  # a Hugging Face id (streamed), a local file/folder, or "pydoc" (offline)
    dataset_split: str = "train"
    text_column: str = "text"

    # --- dtypes and device
    dtype: str = "float32"  # transcoder parameters and optimiser state
    compute_dtype: str | None = None  # the encoder and skip matmuls; None: as `dtype` ("bfloat16" suits A100/L4/H100)
    model_dtype: str = "float32"  # language-model forward pass
    activation_dtype: str = "float32"  # activations kept in the shuffling buffer
    device: str = "auto"  # "auto" picks cuda when available, else cpu

    # --- reproducibility, paths and logging
    seed: int = 0
    run_name: str = "mtc"
    output_dir: str = "runs"
    drive_dir: str = "auto"  # mirror for checkpoints: "auto" (Google Drive in Colab), "none", or a path
    log_every: int = 50  # steps between metric lines (metrics.jsonl, W&B, progress bar)
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in checkpoints/ (final/ is kept too)
    wandb_mode: str = "auto"  # "auto" (online with an API key, else offline), "online", "offline", "disabled"
    wandb_project: str = "mtc"
    wandb_entity: str = ""
    wandb_log_checkpoints: bool = False  # upload checkpoints as W&B artifacts (online only)
    samples_every: int = 10  # steps between updates of the top-activating contexts (0: off)
    samples_top_n: int = 16  # top contexts kept per latent

    def __post_init__(self) -> None:
        for name in ("dtype", "compute_dtype", "model_dtype", "activation_dtype"):
            setattr(self, name, _dtype_name(getattr(self, name)))
        self.prefix_sizes = [int(m) for m in self.prefix_sizes] or [self.d_sae]
        if self.prefix_weights is not None:
            self.prefix_weights = [float(w) for w in self.prefix_weights]
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def n_prefixes(self) -> int:
        return len(self.prefix_sizes)

    @property
    def group_sizes(self) -> list[int]:
        """Latents added by each prefix: the non-cumulative view of `prefix_sizes`."""
        return [m - prev for prev, m in zip([0, *self.prefix_sizes[:-1]], self.prefix_sizes)]

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ValueError` naming the first bad field and how to fix it."""

        def fail(name: str, problem: str, fix: str) -> None:
            raise ValueError(f"TranscoderConfig.{name}: {problem}; {fix}")

        for name in ("d_in", "d_out", "d_sae", "k", "k_aux", "batch_size", "total_tokens", "seq_len",
                     "model_batch_size", "buffer_tokens", "dead_after_tokens", "log_every",
                     "checkpoint_every", "keep_checkpoints", "samples_top_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}", "set it to an integer >= 1")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(name, f"must be a positive finite number, got {value!r}", "set it above 0")
        if not (0 <= self.min_lr <= self.lr):
            fail("min_lr", f"must lie in [0, lr={self.lr}], got {self.min_lr!r}",
                 "lower it to at most lr")
        if not (self.aux_coeff >= 0 and math.isfinite(self.aux_coeff)):
            fail("aux_coeff", f"must be >= 0, got {self.aux_coeff!r}", "use 0 to disable AuxK")
        if not (0 <= self.threshold_momentum < 1):
            fail("threshold_momentum", f"must lie in [0, 1), got {self.threshold_momentum!r}",
                 "0.99 averages the threshold over about 100 steps")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            fail("adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas!r}",
                 "the usual choice is (0.9, 0.999)")
        if self.k > self.d_sae:
            fail("k", f"k={self.k} exceeds d_sae={self.d_sae}", "use k <= d_sae")
        for name in ("dtype", "compute_dtype", "model_dtype", "activation_dtype"):
            if getattr(self, name) not in DTYPE_NAMES and not (name == "compute_dtype" and self.compute_dtype is None):
                fail(name, f"unknown dtype {getattr(self, name)!r}", f"use one of {', '.join(DTYPE_NAMES)}")

        sizes = self.prefix_sizes
        if any(m < 1 for m in sizes):
            fail("prefix_sizes", f"sizes must be positive, got {sizes}", "use cumulative sizes like [128, 512, d_sae]")
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            fail("prefix_sizes", f"must be strictly increasing (cumulative), got {sizes}",
                 "give cumulative sizes, e.g. groups 128/384 are prefix_sizes [128, 512]")
        if sizes[-1] != self.d_sae:
            fail("prefix_sizes", f"must end at d_sae={self.d_sae}, got last size {sizes[-1]}",
                 f"append {self.d_sae} or change d_sae")
        if self.prefix_weights is not None:
            if len(self.prefix_weights) != len(sizes):
                fail("prefix_weights", f"has {len(self.prefix_weights)} entries for {len(sizes)} prefixes",
                     "give one weight per prefix or leave it None for uniform weights")
            if any(not math.isfinite(w) or w < 0 for w in self.prefix_weights) or sum(self.prefix_weights) <= 0:
                fail("prefix_weights", f"must be non-negative with a positive sum, got {self.prefix_weights}",
                     "leave it None for uniform weights")

        if self.warmup_steps < 0:
            fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}", "use 0 for no warmup")
        if self.total_steps < 1:
            fail("total_tokens", f"{self.total_tokens} tokens make no step of batch_size={self.batch_size}",
                 "raise total_tokens to at least batch_size")
        if self.warmup_steps > self.total_steps:
            fail("warmup_steps", f"warmup of {self.warmup_steps} steps is longer than the run "
                 f"({self.total_steps} steps = total_tokens // batch_size)",
                 "lower warmup_steps or raise total_tokens")
        if not self.source_hook or not self.target_hook:
            fail("source_hook", "source_hook and target_hook must both be named", "e.g. blocks.12.ln2.hook_normalized")
        if self.dataset == "pydoc" and self.total_tokens > PYDOC_TOKEN_LIMIT:
            fail("total_tokens", f"{self.total_tokens:,} tokens exceed what the offline 'pydoc' corpus holds "
                 f"(about half a million)", "lower total_tokens or set dataset to a larger corpus, e.g. "
                 "HuggingFaceFW/fineweb-edu")
        if self.normalize_activations not in NORMALIZATIONS:
            fail("normalize_activations", f"unknown normalisation {self.normalize_activations!r}",
                 "use 'mean_norm' (scale-invariant training) or 'none' (train on raw activations)")
        if self.kernels not in ("sparse", "dense"):
            fail("kernels", f"unknown kernels {self.kernels!r}", "use 'sparse' (fast) or 'dense' (reference)")
        if self.calibration_tokens < 0:
            fail("calibration_tokens", f"must be >= 0, got {self.calibration_tokens}",
                 "use 0 to keep the training moving average as the threshold")
        if self.samples_every < 0:
            fail("samples_every", f"must be >= 0, got {self.samples_every}", "use 0 to collect no samples")
        if self.seq_len < 2:
            fail("seq_len", f"must be at least 2 (BOS plus one token), got {self.seq_len}", "128 is the usual choice")
        if self.wandb_mode not in WANDB_MODES:
            fail("wandb_mode", f"unknown mode {self.wandb_mode!r}", f"use one of {', '.join(WANDB_MODES)}")
        if not self.run_name or "/" in self.run_name:
            fail("run_name", f"must be a non-empty name without '/', got {self.run_name!r}", "e.g. gemma2-l12")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        known = {f.name for f in fields(cls)}
        if "decoder" in data and "kernels" not in data:  # configs written before `kernels`
            data = {("kernels" if name == "decoder" else name): value for name, value in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TranscoderConfig: unknown field(s) {unknown}; "
                             f"valid fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TranscoderConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TranscoderConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; pass the config.json of a run")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore it from a checkpoint's copy") from None

    def replace(self, **changes: Any) -> TranscoderConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
