"""Training quality on stored activations: the same tokens for every recipe, and for peer tools.

`python -m mtc bench --quality` (see `mtc.cli`) stores the activations a run would train on, then trains
transcoders on them with the real `Trainer` and evaluates each on the same held-out tokens:

- `collect_cache`: the training batches exactly as the store serves them (shuffled), plus held-out tokens
  from the evaluation documents, written once to a safetensors file that other tools can read too
  (`benchmarks/quality_sparsify.py` trains EleutherAI's sparsify on the same file);
- `CachedStore`: serves those batches to a `Trainer` (resumable, like the real store);
- `evaluate_cached`: held-out FVU of every prefix, L0 and dead share of the saved (raw-unit) model;
- `run_sparsify`: the peer on the same file, in mtc's units, through a Python that has `eai-sparsify`
  (`bench --quality --sparsify-python`), reported in the same rows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from .activations import ActivationBatch, build_store
from .config import TranscoderConfig
from .data import special_token_ids
from .evaluate import PrefixStatistics, held_out_contexts
from .language_model import model_dtype_of
from .transcoder import DEAD_SHARE_TOKENS, MatryoshkaTranscoder


@dataclass
class ActivationCache:
    """Source and target activations of one hook pair: training rows in serving order, held-out rows."""

    train_source: Float[Tensor, "n d_in"]
    train_target: Float[Tensor, "n d_out"]
    eval_source: Float[Tensor, "m d_in"]
    eval_target: Float[Tensor, "m d_out"]
    meta: dict

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).float().contiguous() for name in
                   ("train_source", "train_target", "eval_source", "eval_target")}
        tmp = path.with_name(path.name + ".tmp")
        write_safetensors(tensors, tmp, metadata={k: str(v) for k, v in self.meta.items()})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, train: bool = True) -> ActivationCache:
        """The cache at `path`; with `train=False` only its held-out rows (the training rows come back empty)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"activation cache {path} does not exist; write one with "
                                    "`python -m mtc bench --quality --cache PATH`")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if not train:
                held_out = {name: f.get_tensor(name) for name in ("eval_source", "eval_target")}
                empty = {f"train_{side}": torch.empty(0, held_out[f"eval_{side}"].shape[1])
                         for side in ("source", "target")}
                return cls(**held_out, **empty, meta=meta)
        return cls(**load_file(str(path)), meta=meta)


def write_safetensors(tensors: dict[str, Float[Tensor, "..."]], path: Path, metadata: dict[str, str]) -> None:
    """A float32 safetensors file written one tensor at a time: unlike `safetensors.torch.save_file`, no second
    copy of the data in memory (a 2M-token cache of two 640-wide hooks is 10.5 GB)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            f.write(memoryview(tensor.numpy()).cast("B"))


@torch.no_grad()
def collect_cache(bridge, cfg: TranscoderConfig, eval_tokens: int) -> ActivationCache:
    """The `cfg.total_steps` training batches the store serves for `cfg` (same order as training), and
    `eval_tokens` held-out tokens (BOS excluded, as in training and evaluation)."""
    store = build_store(bridge, [cfg])
    n = cfg.total_steps * cfg.batch_size
    train_source, train_target = torch.empty(n, cfg.d_in), torch.empty(n, cfg.d_out)  # filled in place: one copy
    for step in range(cfg.total_steps):
        batch = store.next_batch()
        rows = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        train_source[rows], train_target[rows] = batch.sources[0], batch.targets[0]
    contexts = held_out_contexts(bridge, cfg.dataset, eval_tokens, cfg.seq_len, cfg.dataset_split, cfg.text_column)
    bos, _ = special_token_ids(bridge.tokenizer)
    sources, targets = [], []
    for chunk in contexts.split(cfg.model_batch_size):
        acts = store.run_model(chunk)
        keep = chunk.to(acts[cfg.source_hook].device) != bos
        sources.append(acts[cfg.source_hook][keep].float().cpu())
        targets.append(acts[cfg.target_hook][keep].float().cpu())
    meta = {"model_name": cfg.model_name, "source_hook": cfg.source_hook, "target_hook": cfg.target_hook,
            "dataset": cfg.dataset, "batch_size": cfg.batch_size, "seed": cfg.seed, "model_dtype": model_dtype_of(bridge)}
    return ActivationCache(train_source=train_source, train_target=train_target,
                           eval_source=torch.cat(sources)[:eval_tokens], eval_target=torch.cat(targets)[:eval_tokens],
                           meta=meta)


class CachedStore:
    """Serves a cache's training rows in order, `batch_size` at a time; after them, the last batches again,
    newest first (only the threshold calibration reads past the budget, and it should see the data the
    model ended on)."""

    def __init__(self, cache: ActivationCache, batch_size: int):
        self.cache, self.batch_size = cache, batch_size
        self.n_batches = len(cache.train_source) // batch_size
        if self.n_batches == 0:
            raise ValueError(f"the cache holds {len(cache.train_source)} training tokens, fewer than "
                             f"batch_size={batch_size}")
        self.served = 0

    def next_batch(self) -> ActivationBatch:
        index = self.served if self.served < self.n_batches else \
            self.n_batches - 1 - (self.served - self.n_batches) % self.n_batches
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        self.served += 1
        zeros = torch.zeros(self.batch_size, dtype=torch.long)
        return ActivationBatch(sources=[self.cache.train_source[rows]], targets=[self.cache.train_target[rows]],
                               context_ids=zeros, positions=zeros)

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = state["served"]


@torch.no_grad()
def evaluate_cached(model: MatryoshkaTranscoder, cache: ActivationCache, batch_size: int = 4096) -> dict:
    """Held-out FVU per prefix (pooled over all held-out tokens), L0 and dead share of the JumpReLU model."""
    statistics = PrefixStatistics(model.cfg.prefix_sizes)
    for start in range(0, len(cache.eval_source), batch_size):
        statistics.add(model, cache.eval_source[start:start + batch_size].to(model.W_enc),
                       cache.eval_target[start:start + batch_size].to(model.W_enc))
    rows = statistics.rows(dense=False)
    return {"full": rows[-1], "prefixes": rows, "tokens": statistics.tokens}


def train_cached(cfg: TranscoderConfig, cache: ActivationCache, device: str = "cpu") -> dict:
    """Train `cfg` on the cache's training rows with the real `Trainer` (into `cfg.run_dir`), then evaluate
    the saved model on the held-out rows. Returns the eval report with the trainer's last metrics."""
    from .checkpoint import load
    from .train import Trainer

    store = CachedStore(cache, cfg.batch_size)
    if cfg.total_steps > store.n_batches:
        raise ValueError(f"total_tokens={cfg.total_tokens} needs {cfg.total_steps} batches; the cache holds "
                         f"{store.n_batches} of batch_size={cfg.batch_size}")
    trainer = Trainer([cfg], store, device=device, resume="never", progress=False)
    start = time.perf_counter()
    (metrics,) = trainer.train()
    seconds = time.perf_counter() - start
    model = load(cfg.run_dir / "final", device=device)
    report = evaluate_cached(model, cache)
    report.update(train=metrics, seconds=seconds)
    return report


def quality_variants(cfg: TranscoderConfig) -> dict[str, TranscoderConfig]:
    """The plain BatchTopK transcoder and the Matryoshka one of `cfg`, with every other setting shared."""
    variants = {"plain": cfg.replace(prefix_sizes=[cfg.d_sae], prefix_weights=None, run_name=f"{cfg.run_name}-plain")}
    if cfg.n_prefixes > 1:
        variants["matryoshka"] = cfg.replace(run_name=f"{cfg.run_name}-matryoshka")
    return variants


def run_quality(cfg: TranscoderConfig, cache: ActivationCache, device: str = "cpu") -> dict[str, dict]:
    """Train and evaluate each variant of `cfg` on the cache (runs go under `cfg.output_dir`, replacing an earlier
    benchmark's runs of the same names)."""
    if cache.train_source.shape[1] != cfg.d_in or cache.train_target.shape[1] != cfg.d_out:
        raise ValueError(f"the cache holds {cache.train_source.shape[1]} -> {cache.train_target.shape[1]} "
                         f"activations but the config has d_in={cfg.d_in}, d_out={cfg.d_out}; collect a new cache")
    reports = {}
    for name, variant in quality_variants(cfg).items():
        if variant.run_dir.exists():  # an earlier benchmark's run of the same name: the benchmark is rerun afresh
            shutil.rmtree(variant.run_dir)
        reports[name] = train_cached(variant, cache, device=device)
    return reports


SPARSIFY_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_sparsify.py"


def check_sparsify_python(python: str | Path) -> None:
    """Fail before any training when `--sparsify-python` cannot run the peer."""
    if not Path(python).is_file():
        raise FileNotFoundError(f"--sparsify-python: {python} is not a file; give the python of a virtualenv with "
                                "eai-sparsify installed (see benchmarks/quality_sparsify.py)")
    if not SPARSIFY_SCRIPT.is_file():
        raise FileNotFoundError(f"--sparsify-python runs {SPARSIFY_SCRIPT}, which this installation lacks; run "
                                "the benchmark from a clone of the repository")


def run_sparsify(python: str | Path, cache_path: str | Path, cfg: TranscoderConfig) -> dict:
    """EleutherAI sparsify's default recipe on the same cache, in mtc's units (`--normalize mean_norm`), at
    `cfg`'s width, k and batch size, reported like `train_cached` (prefix 1 = sparsify's first
    `prefix_sizes[0]` latents)."""
    check_sparsify_python(python)
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "sparsify.json"
        command = [str(python), str(SPARSIFY_SCRIPT), "--cache", str(cache_path), "--normalize", "mean_norm",
                   "--d-sae", str(cfg.d_sae), "--k", str(cfg.k), "--batch-size", str(cfg.batch_size),
                   "--first-latents", str(cfg.prefix_sizes[0]), "--dead-window", str(DEAD_SHARE_TOKENS),
                   "--json", str(result_path)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"sparsify failed (exit code {done.returncode}): {' '.join(command)}\n"
                               + done.stderr[-3000:])
        result = json.loads(result_path.read_text())
    return sparsify_report(result)


def sparsify_report(result: dict) -> dict:
    """`quality_sparsify.py`'s JSON as a `train_cached` report: its first latents, then all of them."""
    settings = result["settings"]
    first = settings["first_latents"]
    rows = [{"prefix": 1, "latents": first, "fvu": result[f"fvu_first_{first}"], "l0": result[f"l0_first_{first}"],
             "dead_pct": float("nan")},
            {"prefix": 2, "latents": settings["d_sae"], "fvu": result["fvu"], "l0": result["l0"],
             "dead_pct": result["dead_pct_eval"]}]
    train = {"dead_pct": result["dead_pct_train"], "dead_pct_100k": result["dead_pct_train"]}
    return {"full": rows[-1], "prefixes": rows, "tokens": settings["eval_tokens"], "train": train,
            "seconds": result["train_seconds"], "sparsify": settings}


def format_quality(reports: dict[str, dict]) -> str:
    """One row per (variant, prefix): held-out FVU, L0 and dead share; the trainer's dead shares at the end."""
    header = f"{'variant':<12}{'prefix':>7}{'latents':>9}{'fvu':>9}{'l0':>8}{'dead% (eval)':>14}" \
             f"{'dead% (train)':>15}{'dead% (100k)':>14}{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for name, report in reports.items():
        for row in report["prefixes"]:
            last = row is report["prefixes"][-1]
            train = report["train"]
            lines.append(f"{name:<12}{'full' if last else row['prefix']:>7}{row['latents']:>9}{row['fvu']:>9.4f}"
                         f"{row['l0']:>8.1f}{row['dead_pct']:>14.1f}"
                         + (f"{train['dead_pct']:>15.1f}{train.get('dead_pct_100k', float('nan')):>14.1f}"
                            f"{report['seconds']:>9.0f}" if last else ""))
    first = next(iter(reports.values()))
    lines.append(f"{first['tokens']} held-out tokens; dead (eval): never fired on them; dead (train): no firing in "
                 f"the last dead_after_tokens training tokens (sparsify: {DEAD_SHARE_TOKENS:,}); dead (100k): no "
                 f"firing in the last {DEAD_SHARE_TOKENS:,}")
    return "\n".join(lines)
