"""The one settings object of a run: `TranscoderConfig`.

Every setting lives here, is validated at construction (before any model or data is loaded) and
round-trips through JSON losslessly, so `config.json` in a run dir is enough to rebuild the run.
The fields are declared in groups (`GROUPS`), each with a one-sentence description that
`python -m mtc train --help` shows; the lists of resumable and store-shared fields derive from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
WANDB_MODES = ("auto", "online", "offline", "disabled")
NORMALIZATIONS = ("mean_norm", "none")
DECODER_INITS = ("random", "batch")
OPTIMIZERS = ("adam", "signsgd")
# The full model's weight in the Matryoshka loss when prefix_weights is None (each inner prefix weighs 1): chosen on
# the toy hierarchy and checked on the demo, see docs/evaluation.md and docs/training.md.
FULL_PREFIX_WEIGHT = 3.0
PYDOC_TOKEN_LIMIT = 2_000_000  # generous: tokenizers differ, the corpus is ~0.5M Gemma tokens


def default_prefix_weights(n_prefixes: int) -> list[float]:
    """The loss weights of `n_prefixes` Matryoshka prefixes when none are given: 1 for each inner prefix, and
    `FULL_PREFIX_WEIGHT` for the full model (one prefix: [1])."""
    return [1.0] * (n_prefixes - 1) + [FULL_PREFIX_WEIGHT if n_prefixes > 1 else 1.0]


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


@dataclass(frozen=True)
class SettingGroup:
    """One group of `TranscoderConfig` fields. Calling it declares a field of the group with its one-sentence
    description, which `python -m mtc train --help` shows under the group's `title`.

    A group also says what its fields are unless a field says otherwise: `resumable` (the field may change
    when a run resumes: how and where a run computes and writes, not what it learns) and `store` (every
    transcoder fed by one activation store must share the field)."""

    name: str
    title: str
    resumable: bool = False
    store: bool = False

    def __call__(self, default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING,
                 resumable: bool | None = None, store: bool | None = None, shown: str | None = None) -> Any:
        """A dataclass field of this group; `shown` replaces the default that `--help` prints."""
        metadata = {"group": self.name, "help": help,
                    "resumable": self.resumable if resumable is None else resumable,
                    "store": self.store if store is None else store}
        if shown is not None:
            metadata["shown"] = shown
        return field(default=default, default_factory=default_factory, metadata=metadata)


MODEL = SettingGroup("model", "language model and hooks")
ARCHITECTURE = SettingGroup("architecture", "transcoder architecture")
SPARSITY = SettingGroup("sparsity", "sparsity (BatchTopK, AuxK, JumpReLU threshold)")
OPTIMISATION = SettingGroup("optimisation", "optimisation")
DATA = SettingGroup("data", "data, batches and budget", store=True)
COMPUTE = SettingGroup("compute", "compute (dtypes, device, kernels, prefetch: how a run computes, not what)",
                       resumable=True)
RUN = SettingGroup("run", "run and I/O (paths, logging, checkpoints, W&B, samples)", resumable=True)
GROUPS = (MODEL, ARCHITECTURE, SPARSITY, OPTIMISATION, DATA, COMPUTE, RUN)


@dataclass
class TranscoderConfig:
    """Settings of one Matryoshka transcoder run.

    Sizes: the transcoder maps `d_in`-wide activations at `source_hook` to `d_out`-wide activations
    at `target_hook` through `d_sae` latents. `prefix_sizes` are cumulative (`m_1 < ... < m_G = d_sae`);
    `prefix_sizes=[d_sae]` is a plain BatchTopK transcoder. Leave `prefix_sizes` empty to get
    `[d_sae]`.

    The fields are grouped (`GROUPS`); each carries its group and description in its metadata. Access
    stays flat (`cfg.d_sae`) and so does the JSON.
    """

    # --- language model and hooks
    model_name: str = MODEL(
        "google/gemma-2-2b", "The language model whose activations are read: a Hugging Face id, a local folder, "
        "or gemma-3-270m-offline.", store=True)
    source_hook: str = MODEL("blocks.12.ln2.hook_normalized", "Hook whose activations the transcoder reads "
                                                              "(its input).")
    target_hook: str = MODEL("blocks.12.hook_mlp_out", "Hook whose activations the transcoder reconstructs "
                                                       "(its output).")

    # --- transcoder architecture
    d_in: int = ARCHITECTURE(2304, "Width of the source hook's activations (train reads it from the model).")
    d_out: int = ARCHITECTURE(2304, "Width of the target hook's activations (train reads it from the model).")
    d_sae: int = ARCHITECTURE(18432, "Number of latents.")
    prefix_sizes: list[int] = ARCHITECTURE(
        help="Cumulative latent counts of the nested Matryoshka prefixes, strictly increasing and ending at d_sae "
        "(empty: one prefix [d_sae], a plain BatchTopK transcoder).", default_factory=list, shown="[d_sae]")
    prefix_weights: list[float] | None = ARCHITECTURE(
        None, "Weight of each prefix's FVU in the loss, normalised to sum 1 (None: 1 for every inner prefix and "
        f"{FULL_PREFIX_WEIGHT:g} for the full model, see `default_prefix_weights`).")
    skip_connection: bool = ARCHITECTURE(
        False, "Add a linear skip path from input to output (x @ W_skip, initialised to zero).")
    normalize_activations: str = ARCHITECTURE(
        "mean_norm", "'mean_norm' trains on each hook's activations divided by a scale from the first batch that "
        "brings their mean norm to sqrt(d), 'none' on raw activations (saved models always work on raw "
        "activations; see mtc/scaling.py).")
    decoder_init: str = ARCHITECTURE(
        "random", "'random': unit-norm random decoder rows; 'batch': each latent's row starts as the mean centred "
        "target of the first batch's tokens it is selected on (random where it is selected on none).")
    clt_layers: list[int] = ARCHITECTURE(
        help="Layers of a cross-layer transcoder (mtc/clt.py), whose hooks are then templates with {layer} (empty: "
        "one transcoder between source_hook and target_hook).", default_factory=list)

    # --- sparsity machinery
    k: int = SPARSITY(96, "Active latents per token on average: BatchTopK keeps the batch_size * k largest "
                          "pre-activations of each batch.")
    k_aux: int = SPARSITY(512, "Dead latents per token whose pre-activations the AuxK loss uses to reconstruct "
                               "the remaining error.")
    aux_coeff: float = SPARSITY(1 / 32, "Weight of the AuxK loss, which revives dead latents (0 disables it).")
    dead_after_tokens: int = SPARSITY(10_000_000, "Tokens without firing after which a latent counts as dead "
                                                  "(and enters the AuxK loss).")
    resample_every: int = SPARSITY(
        0, "Steps between re-initialisations of dead latents on tokens drawn by their error (0: never; none in "
           "the last 30% of the budget).")
    threshold_momentum: float = SPARSITY(
        0.99, "Momentum of the moving average of the smallest kept activation, which is the JumpReLU threshold "
              "unless calibration_tokens sets it.")
    calibration_tokens: int = SPARSITY(
        32_768, "Tokens read after training (at most a tenth of the run's) to set the JumpReLU threshold so "
                "that L0 = k (0 keeps the moving average).", resumable=True)

    # --- optimisation
    optimizer: str = OPTIMISATION(
        "adam", "'adam' (warmup, then cosine decay to min_lr) or 'signsgd' (schedule-free sign descent, "
        "EleutherAI sparsify's default: warmup, then lr throughout; the averaged weights are kept).")
    lr: float = OPTIMISATION(3e-4, "Peak learning rate, reached at the end of the warmup.")
    min_lr: float = OPTIMISATION(3e-5, "Learning rate at the last step, reached by cosine decay from lr.")
    warmup_steps: int = OPTIMISATION(100, "Steps of linear learning-rate warmup up to lr (0: none).")
    adam_betas: tuple[float, float] = OPTIMISATION((0.9, 0.999), "Adam's beta1 and beta2.")
    grad_clip: float = OPTIMISATION(1.0, "Largest gradient norm; larger gradients are scaled down to it.")

    # --- data, batches and budget (shared by every transcoder fed from one store)
    dataset: str = DATA("HuggingFaceFW/fineweb-edu", "Training text: a Hugging Face dataset id (streamed), a "
                                                     "local file or folder, or 'pydoc' (offline).")
    dataset_split: str = DATA("train", "Split of a Hugging Face dataset to stream (local files and 'pydoc' "
                                       "ignore it).")
    text_column: str = DATA("text", "Column of the dataset's rows that holds the text.")
    seq_len: int = DATA(128, "Tokens per packed context fed to the language model (BOS included).")
    batch_size: int = DATA(4096, "Token activations per optimiser step.")
    model_batch_size: int = DATA(32, "Contexts per language-model forward pass.")
    buffer_tokens: int = DATA(262_144, "Token activations in the shuffling buffer that batches are drawn from.")
    seed: int = DATA(0, "Seed of the transcoder's initialisation, the buffer's shuffling and the random "
                        "sample contexts.")
    total_tokens: int = DATA(16_000_000, "Training budget in token activations (total_tokens // batch_size "
                                         "steps).", resumable=True)

    # --- compute: dtypes, device, kernels (how a run computes, not what)
    dtype: str = COMPUTE("float32", "Dtype of the transcoder's parameters and optimiser state.", resumable=False)
    compute_dtype: str | None = COMPUTE(
        None, "Dtype of the encoder and skip matmuls (None: as dtype; bfloat16 suits A100/L4/H100).")
    model_dtype: str = COMPUTE("float32", "Dtype of the language model's forward ('auto': bfloat16 if native, else float32).")
    activation_dtype: str = COMPUTE("float32", "Dtype of the activations kept in the shuffling buffer.",
                                    store=True)
    device: str = COMPUTE("auto", "Device to train on ('auto': cuda when torch sees a GPU, else cpu).")
    kernels: str = COMPUTE(
        "sparse", "Training maths: 'sparse' (gradients touch the selected entries only) or 'dense' (the "
                  "autograd reference), with the same loss and gradients.")
    prefetch: bool = COMPUTE(False, "Compute the next buffer fill in the background (holds two buffers; see "
                                    "docs/performance.md).", store=True)

    # --- run and I/O: paths, logging, checkpoints, W&B, samples
    run_name: str = RUN("mtc", "Name of the run: its folder under output_dir and its W&B name.")
    output_dir: str = RUN("runs", "Folder that holds the run folders.")
    drive_dir: str = RUN("auto", "Mirror for checkpoints: 'auto' (Google Drive in Colab), 'none', or a folder "
                                 "that gets the run's own folder.")
    log_every: int = RUN(50, "Steps between metric lines (metrics.jsonl, W&B, progress bar).")
    checkpoint_every: int = RUN(500, "Steps between checkpoints (one is always written at the end).")
    keep_checkpoints: int = RUN(2, "Newest checkpoints kept locally and in the mirror (final/ is kept too).")
    wandb_mode: str = RUN("auto", "W&B logging: 'auto' (online with an API key, else offline), 'online', "
                                  "'offline' or 'disabled'.")
    wandb_project: str = RUN("mtc", "W&B project to log to.")
    wandb_entity: str = RUN("", "W&B entity (user or team) to log to (empty: your default entity).")
    wandb_log_checkpoints: bool = RUN(False, "Upload checkpoints as W&B artifacts (online only).")
    samples_every: int = RUN(10, "Steps between updates of each latent's top-activating contexts (0: off).")
    samples_top_n: int = RUN(16, "Top-activating contexts kept per latent.")

    def __post_init__(self) -> None:
        for name in ("dtype", "compute_dtype", "model_dtype", "activation_dtype"):
            setattr(self, name, _dtype_name(getattr(self, name)))
        self.prefix_sizes = [int(m) for m in self.prefix_sizes] or [self.d_sae]
        self.clt_layers = [int(layer) for layer in self.clt_layers]
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

    # ------------------------------------------------------------------ field groups
    @classmethod
    def fields_in(cls, group: str | SettingGroup) -> tuple[str, ...]:
        """Names of the fields of `group` (a `SettingGroup` or its name), in declaration order."""
        name = group.name if isinstance(group, SettingGroup) else group
        if name not in {g.name for g in GROUPS}:
            raise ValueError(f"unknown settings group {name!r}; use one of {', '.join(g.name for g in GROUPS)}")
        return tuple(f.name for f in fields(cls) if f.metadata["group"] == name)

    @classmethod
    def description(cls, name: str) -> str:
        """The one-sentence description of field `name` (what `--help` shows)."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        """Fields that may differ between a checkpoint's config and the run resuming it: paths, logging,
        budget and how the numbers are computed (a resumed run may land on another GPU)."""
        return frozenset(f.name for f in fields(cls) if f.metadata["resumable"])

    @classmethod
    def store_fields(cls) -> tuple[str, ...]:
        """Fields every transcoder fed by one activation store must share: the data group, the model and the
        buffer's dtype and prefetching."""
        return tuple(f.name for f in fields(cls) if f.metadata["store"])

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
        if not isinstance(self.resample_every, int) or isinstance(self.resample_every, bool) or self.resample_every < 0:
            fail("resample_every", f"must be a non-negative integer, got {self.resample_every!r}",
                 "use 0 to never resample, or a number of steps")
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
        for name, extra in (("dtype", ()), ("compute_dtype", (None,)), ("model_dtype", ("auto",)), ("activation_dtype", ())):
            if getattr(self, name) not in DTYPE_NAMES + extra:
                fail(name, f"unknown dtype {getattr(self, name)!r}", f"use one of {', '.join(map(str, DTYPE_NAMES + extra))}")

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
                     "give one weight per prefix or leave it None for the default weights")
            if any(not math.isfinite(w) or w < 0 for w in self.prefix_weights) or sum(self.prefix_weights) <= 0:
                fail("prefix_weights", f"must be non-negative with a positive sum, got {self.prefix_weights}",
                     "leave it None for the default weights")

        if self.warmup_steps < 0:
            fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}", "use 0 for no warmup")
        if self.total_steps < 1:
            fail("total_tokens", f"{self.total_tokens} tokens make no step of batch_size={self.batch_size}",
                 "raise total_tokens to at least batch_size")
        if self.warmup_steps > self.total_steps:
            fail("warmup_steps", f"warmup of {self.warmup_steps} steps is longer than the run ({self.total_steps} "
                 "steps = total_tokens // batch_size)", "lower warmup_steps or raise total_tokens")
        if not self.source_hook or not self.target_hook:
            fail("source_hook", "source_hook and target_hook must both be named", "e.g. blocks.12.ln2.hook_normalized")
        if self.dataset == "pydoc" and self.total_tokens > PYDOC_TOKEN_LIMIT:
            fail("total_tokens", f"{self.total_tokens:,} tokens exceed what the offline 'pydoc' corpus holds (about "
                 "half a million)", "lower total_tokens or set dataset to a larger corpus, e.g. HuggingFaceFW/fineweb-edu")
        for name, what, allowed in (("optimizer", "optimiser", OPTIMIZERS),
                                    ("decoder_init", "decoder initialisation", DECODER_INITS),
                                    ("normalize_activations", "normalisation", NORMALIZATIONS),
                                    ("kernels", "kernels", ("sparse", "dense")), ("wandb_mode", "mode", WANDB_MODES)):
            if getattr(self, name) not in allowed:
                fail(name, f"unknown {what} {getattr(self, name)!r}", f"use one of {', '.join(allowed)}")
        for name, zero_means in (("calibration_tokens", "keep the moving average"), ("samples_every", "collect none")):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}", f"use 0 to {zero_means}")
        if self.seq_len < 2:
            fail("seq_len", f"must be at least 2 (BOS plus one token), got {self.seq_len}", "128 is the usual choice")
        if not self.run_name or "/" in self.run_name:
            fail("run_name", f"must be a non-empty name without '/', got {self.run_name!r}", "e.g. gemma2-l12")
        if self.clt_layers:
            self._validate_clt(fail)

    def _validate_clt(self, fail) -> None:
        if any(b <= a for a, b in zip(self.clt_layers, self.clt_layers[1:])) or min(self.clt_layers) < 0:
            fail("clt_layers", f"must be increasing layer numbers, got {self.clt_layers}", "e.g. [0, 1, 2, 3]")
        if not all("{layer}" in hook for hook in (self.source_hook, self.target_hook)):
            fail("source_hook", "a cross-layer transcoder's hooks must name {layer}", "e.g. blocks.{layer}.hook_mlp_out")
        for name, allowed in (("skip_connection", False), ("decoder_init", "random"),
                              ("kernels", "sparse"), ("samples_every", 0), ("resample_every", 0)):
            if getattr(self, name) != allowed:
                fail(name, f"is {getattr(self, name)!r}; a cross-layer transcoder trains only with {allowed!r}",
                     f"set {name} to {allowed!r}")

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
