"""Training one or several transcoders from one activation store.

Each transcoder (a `TranscoderConfig`) has its own model, Adam optimiser, run dir, metrics and
checkpoints; they share the store, so one language-model pass feeds them all. The loop is:

    batch -> BatchTopK forward, nested-prefix loss + AuxK -> backward -> drop the decoder-parallel
    gradient -> clip -> Adam with warmup + cosine learning rate -> renormalise decoder rows

Checkpoints are atomic and resumable bit for bit: weights, optimiser, firing counters, RNG and the
store's position all travel with them. Non-finite loss or weights stop the run at once.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import lock
from .checkpoint import (checkpoint_step, clean_temporaries, config_differences, list_checkpoints, load_checkpoint,
                         prune_checkpoints, save, write_checkpoint)
from .config import TranscoderConfig
from .errors import CheckpointError
from .logger import METRICS_FILE, RunLogger, truncate_metrics
from .mirror import Mirror
from .samples import SampleCollector, context_lookup
from .scaling import ActivationScales
from .transcoder import LOCAL, BatchReduction, MatryoshkaTranscoder, TrainingOutput


class NonFiniteError(RuntimeError):
    """The loss or the weights stopped being finite; the last good checkpoint is kept."""


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written before stopping."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


DIVERGING_FVU = 2.0  # worse than predicting the mean (FVU 1) by far
DIVERGING_INTERVALS = 3  # consecutive log lines above it, with no new best, before the trainer warns


def diverged(run: Run) -> bool:
    """Whether the run ended diverging: its last log lines were all above DIVERGING_FVU without improving."""
    return run.diverging_intervals >= DIVERGING_INTERVALS


def learning_rate(step: int, cfg: TranscoderConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay reaching `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def check_budget(cfg: TranscoderConfig, step: int, checkpoint: Path) -> None:
    """Refuse a token budget that ends before a checkpoint already reached: the run cannot be shortened
    (its final weights would be the longer run's under a shorter run's config). Extending is allowed."""
    if step > cfg.total_steps:
        raise ValueError(f"total_tokens: {cfg.total_tokens:,} tokens make {cfg.total_steps} steps, but checkpoint "
                         f"{checkpoint} is at step {step}; a run cannot be shortened below its checkpoint. Set "
                         f"--total-tokens to at least {step * cfg.batch_size:,} (extending is allowed), or choose "
                         f"a new --run-name to start another run")


def make_optimizer(model: MatryoshkaTranscoder, cfg: TranscoderConfig) -> torch.optim.Adam:
    """Adam over the transcoder's parameters; the fused kernel (one pass over each tensor instead of a
    dozen) where torch has it, CPU and CUDA."""
    fused = model.W_enc.device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=fused)


def train_step(model: MatryoshkaTranscoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lr: float, reduction: BatchReduction = LOCAL) -> TrainingOutput:
    """One optimiser step on a batch: loss, backward, drop the decoder-parallel gradient, clip, Adam at
    `lr`, renormalise decoder rows. Raises `FloatingPointError` (before touching the weights) when the
    loss is not finite."""
    out = model.training_forward(x, y, reduction=reduction)
    if not torch.isfinite(out.reported_loss):
        raise FloatingPointError("non-finite loss")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    reduction.sum_gradients(model.parameters())  # data-parallel: each rank's gradient is its part of the batch's
    model.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    model.normalize_decoder()
    return out


@dataclass
class Run:
    """One transcoder being trained."""

    cfg: TranscoderConfig
    model: MatryoshkaTranscoder
    optimizer: torch.optim.Optimizer
    run_dir: Path
    mirror: Mirror
    samples: SampleCollector | None = None
    interval: dict = field(default_factory=dict)  # detached running sums since the last log line
    logger: RunLogger | None = None
    last_metrics: dict = field(default_factory=dict)
    scales: ActivationScales = field(default_factory=ActivationScales)  # training units = raw / scales
    diverging_intervals: int = 0  # consecutive log lines with FVU above DIVERGING_FVU and no new best
    best_fvu: float = math.inf


def accumulate(sums: dict, out: TrainingOutput) -> None:
    """Add one step's losses to the running sums of a log interval (on the device, no sync)."""
    for name in ("loss", "fvu_per_prefix", "aux_loss", "l0"):
        value = (out.reported_loss if name == "loss" else getattr(out, name)).detach().float()
        sums[name] = sums[name] + value if name in sums else value
    sums["n_dead"] = out.n_dead
    sums["steps"] = sums.get("steps", 0) + 1


class Trainer:
    """Trains `configs` (one transcoder each) from `store`, which must serve one hook pair per config in
    the same order (see `mtc.activations.build_store`).

    `resume`: "auto" continues from the newest complete checkpoint (local or mirror) that loads (a damaged
    one is skipped with a warning naming the file and why), "never" starts afresh, or a path to a
    `step_<N>` folder (single transcoder). A checkpoint beyond the token budget is refused.

    Data-parallel training (`mtc.data_parallel`) passes the ranks' `reduction` and `writer=False` on every
    rank but 0: those train identically but write nothing.
    """

    def __init__(self, configs: list[TranscoderConfig], store, device: str | torch.device = "cpu",
                 mirror_dirs: list[Path | None] | None = None, resume: str = "auto", progress: bool = True,
                 reduction: BatchReduction = LOCAL, writer: bool = True):
        if not configs:
            raise ValueError("Trainer needs at least one TranscoderConfig")
        for cfg in configs[1:]:
            if cfg.total_tokens != configs[0].total_tokens or cfg.batch_size != configs[0].batch_size:
                raise ValueError("transcoders trained together must share total_tokens and batch_size")
        dirs = [cfg.run_dir for cfg in configs]
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"each transcoder needs its own run_name; got run dirs {[str(d) for d in dirs]}")
        self.store = store
        self.device = torch.device(device)
        self.reduction, self.writer = reduction, writer
        self.progress = progress and writer
        self.total_steps = configs[0].total_steps
        self.step = 0
        mirror_dirs = mirror_dirs or [None] * len(configs)
        self._mirror_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtc-mirror")
        self.runs = [self._new_run(cfg, mirror) for cfg, mirror in zip(configs, mirror_dirs)]
        self._stop_signal: int | None = None
        self._resumed = self._resume(resume)

    # ------------------------------------------------------------------ setup
    def _new_run(self, cfg: TranscoderConfig, mirror_dir: Path | None) -> Run:
        torch.manual_seed(cfg.seed)
        model = MatryoshkaTranscoder(cfg, device=self.device)
        optimizer = make_optimizer(model, cfg)
        samples = SampleCollector(cfg.d_sae, top_n=cfg.samples_top_n, device=self.device, seed=cfg.seed) \
            if cfg.samples_every and self.writer else None
        mirror = Mirror(mirror_dir, cfg.run_dir, cfg.keep_checkpoints, self._mirror_pool)
        return Run(cfg=cfg, model=model, optimizer=optimizer, run_dir=cfg.run_dir, mirror=mirror,
                   samples=samples)

    def _resume(self, resume: str) -> bool:
        if resume == "never":
            for run in self.runs:
                found = self._checkpoints_by_step(run)
                if found:
                    raise ValueError(f"{run.run_dir} (or its mirror) already holds checkpoints of a run "
                                     f"(steps {sorted(found)}); starting afresh there would mix two runs. "
                                     f"Choose a new run_name, or delete the old run's folder")
            return False
        if resume != "auto":
            if len(self.runs) != 1:
                raise ValueError("resume from an explicit checkpoint path works for a single transcoder")
            if not Path(resume).exists():
                raise FileNotFoundError(f"--resume {resume} does not exist; pass a checkpoints/step_<N> folder, "
                                        f"'auto' or 'never'")
            self._restore([Path(resume)])
            return True
        available = [self._checkpoints_by_step(run) for run in self.runs]
        if not any(available):
            return False
        common = set.intersection(*(set(found) for found in available))
        if not common:
            raise ValueError("the transcoders' run dirs hold checkpoints of different steps "
                             f"({[sorted(found) for found in available]}); resume them separately or use --resume never")
        skipped = []
        for step in sorted(common, reverse=True):  # the newest checkpoint that loads
            try:
                self._restore([found[step] for found in available])
                return True
            except CheckpointError as err:
                skipped.append(str(err))
                print(f"warning: skipping {err}; trying the previous checkpoint", file=sys.stderr)
        raise CheckpointError(self.runs[0].run_dir / "checkpoints",
                              f"no checkpoint loads ({'; '.join(skipped)}). Restore one from a copy, delete the "
                              f"damaged step folders to start afresh, or choose a new run_name")

    @staticmethod
    def _checkpoints_by_step(run: Run) -> dict[int, Path]:
        found = run.mirror.checkpoints()
        found.update({checkpoint_step(p): p for p in list_checkpoints(run.run_dir)})  # local wins ties
        return found

    def _read_checkpoint(self, run: Run, path: Path) -> tuple[MatryoshkaTranscoder, dict, dict]:
        """Load and check one checkpoint without touching the run: `CheckpointError` when a file is damaged
        (the caller may fall back to an older one), `ValueError` when it belongs to another run or lies
        beyond the token budget."""
        saved, state, meta = load_checkpoint(path, device=self.device)
        differences = config_differences(saved.cfg, run.cfg)
        if differences:
            raise ValueError(f"checkpoint {path} belongs to a different run: " + "; ".join(differences)
                             + ". Use the run's own config, or a new run_name to start another run.")
        check_budget(run.cfg, state["step"], path)
        return saved, state, meta

    def _restore(self, paths: list[Path]) -> None:
        loaded = [self._read_checkpoint(run, path) for run, path in zip(self.runs, paths)]  # all, before any change
        for run, path, (saved, state, meta) in zip(self.runs, paths, loaded):
            for name in ("model_dtype", "activation_dtype", "compute_dtype", "kernels"):
                if getattr(saved.cfg, name) != getattr(run.cfg, name):
                    print(f"note: {name} changed from {getattr(saved.cfg, name)} to {getattr(run.cfg, name)} "
                          "(another GPU?); the run continues but is no longer bit-identical to an "
                          "uninterrupted one", file=sys.stderr)
            if state.get("world_size", 1) != self.reduction.world_size:
                print(f"note: {path} was written by {state.get('world_size', 1)} process(es), this run has "
                      f"{self.reduction.world_size}; it continues with the same batches, but sums over the batch are "
                      "taken in another order, so it is not bit-identical to an uninterrupted run", file=sys.stderr)
            if run.mirror.holds(path) and self.writer:
                run.mirror.fetch_history()
            # model.safetensors is in raw units; training continues from the training-unit weights
            run.model.load_state_dict(state.get("model", saved.state_dict()))
            run.scales = ActivationScales.from_dict(state.get("scales"))
            run.model.tokens_since_fired.copy_(state["tokens_since_fired"])
            run.optimizer.load_state_dict(state["optimizer"])
            if run.samples is not None and state.get("samples") is not None:
                try:
                    run.samples.load_state_dict(state["samples"])
                except (ValueError, RuntimeError) as err:  # other samples_top_n, or another device
                    print(f"note: activation samples restart from this step ({err})", file=sys.stderr)
            run.interval = {k: v.to(self.device) if torch.is_tensor(v) else v
                            for k, v in state.get("interval", {}).items()}
            run.last_metrics = meta.get("metrics", {})
            self.step = state["step"]
            if self.writer:
                truncate_metrics(run.run_dir, self.step)
        torch.set_rng_state(state["torch_rng"])
        self.store.load_state_dict(state["store"])
        print(f"resumed from step {self.step} ({paths[0]})", file=sys.stderr)

    # ------------------------------------------------------------------ training
    def train(self) -> list[dict]:
        """Run to the end of the token budget; returns each transcoder's last metrics."""
        with lock.hold([run.run_dir for run in self.runs] if self.writer else []):
            self._clean_temporaries()
            try:
                return self._train()
            finally:
                self._clean_temporaries()  # what a failed write (a full disk) left behind

    def _clean_temporaries(self) -> None:
        """Leftovers of interrupted writes, locally and on the mirror (safe: this process holds the run dir)."""
        for run in self.runs if self.writer else []:
            clean_temporaries(run.run_dir)
            run.mirror.clean()

    def _train(self) -> list[dict]:
        for run in self.runs if self.writer else []:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            run.cfg.save(run.run_dir / "config.json")
            run.logger = RunLogger(run.cfg, run.run_dir, resume=self._resumed)
        if self.writer:
            print(self.runs[0].logger.message, file=sys.stderr)
        restore_signals = self._install_signal_handlers()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not self.progress,
                   dynamic_ncols=True, desc=self.runs[0].cfg.run_name)
        tick, tick_step = time.perf_counter(), self.step
        try:
            while self.step < self.total_steps:
                batch = self.store.next_batch()
                if self.step == 0:
                    for run, x, y in zip(self.runs, batch.sources, batch.targets):
                        x, y = self.reduction.gather(x), self.reduction.gather(y)  # the whole batch
                        if run.cfg.normalize_activations == "mean_norm":
                            run.scales = ActivationScales.estimate(x, y)
                        run.model.init_from_batch(*self._training_units(run, x, y))
                outputs = [self._train_step(run, x, y) for run, x, y in zip(self.runs, batch.sources, batch.targets)]
                self._collect_samples(outputs, batch)
                for run, out in zip(self.runs, outputs):
                    accumulate(run.interval, out)
                self.step += 1
                bar.update(1)
                last = self.step == self.total_steps
                if self.step % self.runs[0].cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    tokens_per_s = (self.step - tick_step) * self.runs[0].cfg.batch_size / (now - tick)
                    tick, tick_step = now, self.step
                    for run in self.runs:
                        self._log(run, tokens_per_s)
                    first = self.runs[0].last_metrics
                    bar.set_postfix(tok_s=f"{tokens_per_s:,.0f}", fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}")
                if self.step % self.runs[0].cfg.checkpoint_every == 0 or last:
                    self.checkpoint()
                if self._stop_requested():
                    if self.step % self.runs[0].cfg.checkpoint_every and not last:
                        self.checkpoint()
                    raise StopRequested(f"stopped by signal {self._stop_signal} at step {self.step}; "
                                        "checkpoint written, --resume auto continues", self._stop_signal)
            self._calibrate_thresholds()
            for run in self.runs:
                self._save_final(run)
                self._save_samples(run)
                self._to_raw_units(run)
        finally:
            bar.close()
            restore_signals()
            for run in self.runs:
                run.mirror.wait()
            for run in self.runs:
                if run.logger is not None:
                    run.logger.finish()
        return [run.last_metrics for run in self.runs]

    def _training_units(self, run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, in the transcoder's dtype and training units (divided by the scales)."""
        dtype = run.model.W_enc.dtype
        x = x.to(self.device, dtype, non_blocking=True)
        y = y.to(self.device, dtype, non_blocking=True)
        if run.scales.is_identity:
            return x, y
        return x / run.scales.source, y / run.scales.target

    def _train_step(self, run: Run, x: torch.Tensor, y: torch.Tensor) -> TrainingOutput:
        x, y = self._training_units(run, x, y)
        try:
            return train_step(run.model, run.optimizer, x, y, learning_rate(self.step, run.cfg), self.reduction)
        except FloatingPointError:
            raise NonFiniteError(self._non_finite_message(run, "the loss")) from None

    def _non_finite_message(self, run: Run, what: str) -> str:
        kept = list_checkpoints(run.run_dir)
        last_good = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
        return (f"{what} of {run.cfg.run_name} became non-finite at step {self.step + 1}; {last_good}. "
                f"Try a lower lr (now {run.cfg.lr:g}), a longer warmup_steps (now {run.cfg.warmup_steps}), "
                f"grad_clip, or model_dtype='float32' if the language model overflows in float16.")

    def _log(self, run: Run, tokens_per_s: float) -> None:
        """One metrics line: losses, FVUs and L0 averaged over the steps since the last line (a single
        batch is noisy), dead count as of the last step."""
        sums, steps = run.interval, run.interval["steps"]
        averaged = TrainingOutput(loss=sums["loss"] / steps, fvu_per_prefix=sums["fvu_per_prefix"] / steps,
                                  aux_loss=sums["aux_loss"] / steps, l0=sums["l0"] / steps,
                                  n_dead=sums["n_dead"], d_sae=run.cfg.d_sae)
        run.interval = {}
        metrics = averaged.metrics()
        metrics.update(step=self.step, tokens=self.step * run.cfg.batch_size,
                       lr=learning_rate(self.step - 1, run.cfg), tokens_per_s=tokens_per_s)
        run.last_metrics = metrics
        if run.logger is not None:
            run.logger.log(metrics)
        self._warn_if_diverging(run, metrics["fvu"])

    def _warn_if_diverging(self, run: Run, fvu: float) -> None:
        """A run can diverge while staying finite (FVU in the thousands and rising); say so once. A run still
        improving from a poor start (FVU above 2 but falling) is not diverging."""
        stalled = fvu > DIVERGING_FVU and fvu >= run.best_fvu
        run.best_fvu = min(run.best_fvu, fvu)
        run.diverging_intervals = run.diverging_intervals + 1 if stalled else 0
        if run.diverging_intervals == DIVERGING_INTERVALS and self.writer:
            tqdm.write(f"warning: {run.cfg.run_name} is diverging: FVU above {DIVERGING_FVU:g} and not improving for "
                       f"{DIVERGING_INTERVALS} log intervals in a row (now {fvu:.3g}; predicting the mean gives "
                       f"1). Try a lower lr (now {run.cfg.lr:g}), a longer warmup_steps (now "
                       f"{run.cfg.warmup_steps}) or a smaller grad_clip (now {run.cfg.grad_clip:g}).",
                       file=sys.stderr)

    # ------------------------------------------------------------------ saving
    def checkpoint(self) -> None:
        """Write a checkpoint of every transcoder at the current step (and mirror it)."""
        for run in self.runs:
            if not all(torch.isfinite(p).all() for p in run.model.parameters()):
                raise NonFiniteError(self._non_finite_message(run, "the weights"))
            if not self.writer:
                continue
            state = {"step": self.step, "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
                     "optimizer": run.optimizer.state_dict(),
                     "tokens_since_fired": run.model.tokens_since_fired.cpu(),
                     "samples": run.samples.state_dict() if run.samples is not None else None,
                     "interval": {k: v.cpu() if torch.is_tensor(v) else v for k, v in run.interval.items()},
                     "store": self.store.state_dict(), "torch_rng": torch.get_rng_state(),
                     "world_size": self.reduction.world_size,
                     "scales": run.scales.to_dict()}
            meta = {"tokens": self.step * run.cfg.batch_size, "metrics": run.last_metrics, "time": time.time(),
                    "activation_scales": run.scales.to_dict()}
            path = write_checkpoint(run.run_dir, self.step, run.model, state, meta, run.scales)
            run.mirror.wait()  # the background copy may still be reading an older checkpoint
            prune_checkpoints(run.run_dir, run.cfg.keep_checkpoints)
            run.logger.log_checkpoint(path, self.step)
            run.mirror.copy([(path, f"checkpoints/{path.name}"), (run.run_dir / METRICS_FILE, METRICS_FILE),
                               (run.run_dir / "config.json", "config.json")], prune=True)

    def _collect_samples(self, outputs, batch) -> None:
        for run, out in zip(self.runs, outputs):
            if run.samples is not None and self.step % run.cfg.samples_every == 0:
                latents = out.dense_latents() * run.scales.target  # in raw units, as the saved model's
                run.samples.update(latents, batch.context_ids.to(self.device), batch.positions.to(self.device))

    def _save_samples(self, run: Run) -> None:
        """Top-activating contexts with their tokens, under `samples/` (needs a store that can re-read
        its contexts; synthetic stores have none)."""
        make_contexts = getattr(self.store, "make_contexts", None)
        if run.samples is None or not self.writer or make_contexts is None or run.samples.tokens_seen == 0:
            return
        meta = {"model_name": run.cfg.model_name, "source_hook": run.cfg.source_hook,
                "target_hook": run.cfg.target_hook, "prefix_sizes": run.cfg.prefix_sizes, "step": self.step}
        path = run.samples.save(run.run_dir / "samples", context_lookup(make_contexts), meta=meta)
        run.mirror.copy([(path, "samples")], prune=False)

    def _calibrate_thresholds(self) -> None:
        """Set each transcoder's inference threshold from `calibration_tokens` tokens after the budget, at most
        a tenth of the run's (the same tokens on every resume: the store continues where training stopped)."""
        cfg = self.runs[0].cfg
        if cfg.calibration_tokens == 0:
            return
        n_batches = min(-(-cfg.calibration_tokens // cfg.batch_size), max(1, cfg.total_steps // 10))
        if getattr(self.store, "total_batches", None) is not None:
            self.store.total_batches = cfg.total_steps + n_batches  # one buffer fill for them, not one per batch
        try:
            batches = [self.store.next_batch() for _ in range(n_batches)]
        except RuntimeError as err:  # a small corpus used up by the run
            tqdm.write(f"note: the JumpReLU threshold stays the training moving average ({err})", file=sys.stderr)
            return
        for i, run in enumerate(self.runs):
            sources = [self._training_units(run, self.reduction.gather(batch.sources[i]), batch.targets[i])[0]
                       for batch in batches]
            run.model.calibrate_threshold(sources)

    @staticmethod
    def _to_raw_units(run: Run) -> None:
        """After the run, the in-memory transcoder becomes what `final/` holds: raw units, scales folded in."""
        run.model.load_state_dict(run.scales.fold(run.model.state_dict()))
        run.scales = ActivationScales()

    def _save_final(self, run: Run) -> None:
        if not self.writer:
            return
        tmp, final = run.run_dir / ".tmp-final", run.run_dir / "final"
        save(run.model, tmp, run.scales)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        run.mirror.copy([(final, "final")], prune=False)

    def _stop_requested(self) -> bool:
        """Whether SIGTERM/SIGINT arrived (on any rank: all ranks must stop at the same step)."""
        if self.reduction.world_size > 1 and self.reduction.max(
                torch.tensor(float(self._stop_signal is not None), device=self.device)):
            self._stop_signal = self._stop_signal or signal.SIGTERM
        return self._stop_signal is not None

    def _install_signal_handlers(self):
        """SIGTERM/SIGINT finish the current step, write a checkpoint and stop (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def request_stop(signum, _frame):
            self._stop_signal = signum

        for sig in previous:
            signal.signal(sig, request_stop)
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

