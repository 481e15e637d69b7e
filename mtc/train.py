"""Training one or several transcoders from one activation store.

Each transcoder (a `TranscoderConfig`) has its own model, Adam optimiser, run dir, metrics and checkpoints;
they share the store, so one language-model pass feeds them all. `Trainer.train` is a short loop:

    next batch (the store's buffer fills show as their own progress) -> one optimiser step per transcoder
    (`mtc.optim.train_step`) -> a metrics line when due -> a checkpoint when due -> stop on a signal

then the thresholds are calibrated and `final/` is written. What the writing process puts on disk goes
through one object per run (`mtc.run_files`). Checkpoints are atomic and resumable bit for bit: weights,
optimiser, firing counters, RNG and the store's position travel with them; where to resume is decided once,
before training (`mtc.resume`). Non-finite loss or weights stop the run at once.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints
from .config import TranscoderConfig
from .mirror import Mirror
from .optim import learning_rate, make_optimizer, train_step, weights_to_keep
from .parallel import BatchReduction, Process
from .progress import Progress
from .resample import resample_dead, resampling_due
from .resume import ResumePoint, decide_resume, restore_newest, trainer_state
from .run_files import NoFiles, RunFiles
from .samples import SampleCollector
from .scaling import ActivationScales, scales_for
from .clt import build_model
from .transcoder import DEAD_SHARE_TOKENS, MatryoshkaTranscoder, TrainingOutput


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


@dataclass
class Run:
    """One transcoder being trained."""

    cfg: TranscoderConfig
    model: MatryoshkaTranscoder
    optimizer: torch.optim.Optimizer
    run_dir: Path
    files: NoFiles  # what this process writes for the run: `RunFiles` on the writing rank
    mirror_dir: Path | None = None
    samples: SampleCollector | None = None
    interval: dict = field(default_factory=dict)  # detached running sums since the last log line
    last_metrics: dict = field(default_factory=dict)
    scales: ActivationScales = field(default_factory=ActivationScales)  # training units = raw / scales
    diverging_intervals: int = 0  # consecutive log lines with FVU above DIVERGING_FVU and no new best
    best_fvu: float = math.inf


def accumulate(sums: dict, out: TrainingOutput) -> None:
    """Add one step's losses to the running sums of a log interval (on the device, no sync)."""
    for name in ("loss", "fvu_per_prefix", "aux_loss", "l0"):
        value = (out.reported_loss if name == "loss" else getattr(out, name)).detach().float()
        sums[name] = sums[name] + value if name in sums else value
    sums["n_dead"], sums["d_sae"] = out.n_dead, out.d_sae  # d_sae: latents of every layer, for a CLT
    sums["steps"] = sums.get("steps", 0) + 1


class Trainer:
    """Trains `configs` (one transcoder each) from `store`, which must serve one hook pair per config in
    the same order (see `mtc.activations.build_store`).

    `resume`: where to continue from, as `mtc.resume.decide_resume` decided (None: start afresh), or the policy
    itself ("auto", "never" or a `step_<N>` folder), decided here. The caller holds the run dirs' lock
    (`mtc.lock.hold`), as `python -m mtc train` does.

    `process`: under `torchrun` (`mtc.parallel.join`), this rank and the reductions over the batch's shares;
    ranks other than 0 train identically but write nothing.
    """

    def __init__(self, configs: list[TranscoderConfig], store, device: str | torch.device = "cpu",
                 mirror_dirs: list[Path | None] | None = None, resume: ResumePoint | str | None = "auto",
                 progress: bool = True, process: Process | None = None):
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
        self.process = process or Process(device=str(self.device))
        self.reduction: BatchReduction = self.process.reduction
        self.progress = progress and self.process.writer
        self.total_steps = configs[0].total_steps
        self.step = 0
        mirror_dirs = mirror_dirs or [None] * len(configs)
        self._mirror_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtc-mirror")
        self.runs = [self._new_run(cfg, mirror) for cfg, mirror in zip(configs, mirror_dirs)]
        self._stop_signal: int | None = None
        if isinstance(resume, str):
            resume = decide_resume(configs, resume, mirror_dirs)
        self._resumed = resume is not None
        if resume is not None:
            self.step = restore_newest(self.runs, self.store, resume, self.device, self.reduction.world_size)

    # ------------------------------------------------------------------ setup and resume
    def _new_run(self, cfg: TranscoderConfig, mirror_dir: Path | None) -> Run:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, device=self.device)
        optimizer = make_optimizer(model, cfg)
        writer = self.process.writer
        samples = SampleCollector(cfg.d_sae, top_n=cfg.samples_top_n, device=self.device, seed=cfg.seed) \
            if cfg.samples_every and writer else None
        files = RunFiles(cfg, Mirror(mirror_dir, cfg.run_dir, cfg.keep_checkpoints, self._mirror_pool)) \
            if writer else NoFiles()
        return Run(cfg=cfg, model=model, optimizer=optimizer, run_dir=cfg.run_dir, files=files,
                   mirror_dir=mirror_dir, samples=samples)

    # ------------------------------------------------------------------ training
    def train(self) -> list[dict]:
        """Run to the end of the token budget; returns each transcoder's last metrics."""
        for run in self.runs:
            run.files.clean()  # what an interrupted write left behind
        try:
            return self._train()
        finally:
            for run in self.runs:
                run.files.clean()  # what a failed write (a full disk) left behind

    def _train(self) -> list[dict]:
        for run in self.runs:
            run.files.open(resumed=self._resumed)
        if self.runs[0].files.writes:
            print(self.runs[0].files.message, file=sys.stderr)
        progress = Progress(self.store, self.total_steps, self.step, self.runs[0].cfg.run_name, self.progress)
        self._clock = (time.perf_counter(), self.step)
        try:
            with self._signals_stop_at_a_step():
                while self.step < self.total_steps:
                    batch = progress.wait_for(self.store.next_batch)
                    self._train_on(batch)
                    progress.step(**self._log_if_due())
                    if self.step % self.runs[0].cfg.checkpoint_every == 0 or self.step == self.total_steps:
                        self.checkpoint()
                    self._stop_if_requested()
            self._finish()
        finally:
            progress.close()
            for run in self.runs:
                run.files.close()
        return [run.last_metrics for run in self.runs]

    def _train_on(self, batch) -> None:
        """One optimiser step of every transcoder on its pair of the batch (the first also sets the activation
        scales and the data-dependent initialisation)."""
        if self.step == 0:
            for run, x, y in zip(self.runs, batch.sources, batch.targets):
                x, y = self.reduction.gather(x), self.reduction.gather(y)  # the whole batch
                if run.cfg.normalize_activations == "mean_norm":
                    run.scales = scales_for(run.cfg).estimate(x, y)
                run.model.init_from_batch(*self._training_units(run, x, y))
        outputs = [self._train_step(run, x, y) for run, x, y in zip(self.runs, batch.sources, batch.targets)]
        self._collect_samples(outputs, batch)
        for run, out in zip(self.runs, outputs):
            accumulate(run.interval, out)
        self.step += 1
        for run, x, y in zip(self.runs, batch.sources, batch.targets):
            if resampling_due(self.step, run.cfg):
                resample_dead(run.model, run.optimizer, *self._training_units(run, self.reduction.gather(x),
                                                                              self.reduction.gather(y)))

    def _log_if_due(self) -> dict:
        """Every `log_every` steps and at the end: one metrics line per transcoder; returns the progress bar's
        figures (none between log lines)."""
        if self.step % self.runs[0].cfg.log_every and self.step != self.total_steps:
            return {}
        now, (tick, tick_step) = time.perf_counter(), self._clock
        tokens_per_s = (self.step - tick_step) * self.runs[0].cfg.batch_size / (now - tick)
        self._clock = (now, self.step)
        for run in self.runs:
            self._log(run, tokens_per_s)
        first = self.runs[0].last_metrics
        return dict(tok_s=f"{tokens_per_s:,.0f}", fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}")

    def _stop_if_requested(self) -> None:
        """After SIGTERM/SIGINT (on any rank): checkpoint this step, if not just done, and stop."""
        if not self._stop_requested():
            return
        if self.step % self.runs[0].cfg.checkpoint_every and self.step != self.total_steps:
            self.checkpoint()
        raise StopRequested(f"stopped by signal {self._stop_signal} at step {self.step}; "
                            "checkpoint written, --resume auto continues", self._stop_signal)

    def _finish(self) -> None:
        """After the last step: calibrate the thresholds, write `final/` and the samples, and leave each
        in-memory transcoder in raw units, as `final/` holds it (with the averaged weights of schedule-free
        sign descent)."""
        for run in self.runs:
            run.model = weights_to_keep(run.model, run.optimizer)
        self._calibrate_thresholds()
        for run in self.runs:
            run.files.final(run.model, run.scales)
            self._save_samples(run)
            run.model.load_state_dict(run.scales.fold(run.model.state_dict()))
            run.scales = scales_for(run.cfg)()

    def _training_units(self, run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, in the transcoder's dtype and training units (divided by the scales)."""
        dtype = run.model.b_dec.dtype
        x = x.to(self.device, dtype, non_blocking=True)
        y = y.to(self.device, dtype, non_blocking=True)
        return run.scales.training_units(x, y)

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
                                  n_dead=sums["n_dead"], d_sae=sums.get("d_sae", run.cfg.d_sae))
        run.interval = {}
        metrics = averaged.metrics()
        silent = run.model.tokens_since_fired >= DEAD_SHARE_TOKENS
        metrics.update(dead_pct_100k=100.0 * float(silent.float().mean()), step=self.step,
                       tokens=self.step * run.cfg.batch_size, lr=learning_rate(self.step - 1, run.cfg),
                       tokens_per_s=tokens_per_s)
        run.last_metrics = metrics
        run.files.log(metrics)
        self._warn_if_diverging(run, metrics["fvu"])

    def _warn_if_diverging(self, run: Run, fvu: float) -> None:
        """A run can diverge while staying finite (FVU in the thousands and rising); say so once. A run still
        improving from a poor start (FVU above 2 but falling) is not diverging."""
        stalled = fvu > DIVERGING_FVU and fvu >= run.best_fvu
        run.best_fvu = min(run.best_fvu, fvu)
        run.diverging_intervals = run.diverging_intervals + 1 if stalled else 0
        if run.diverging_intervals == DIVERGING_INTERVALS and self.process.writer:
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
            meta = {"tokens": self.step * run.cfg.batch_size, "metrics": run.last_metrics, "time": time.time(),
                    "activation_scales": run.scales.to_dict()}
            state = partial(trainer_state, run, self.step, self.store, self.reduction.world_size)
            run.files.checkpoint(self.step, weights_to_keep(run.model, run.optimizer), state, meta, run.scales)

    def _collect_samples(self, outputs, batch) -> None:
        for run, out in zip(self.runs, outputs):
            if run.samples is not None and self.step % run.cfg.samples_every == 0:
                latents = out.dense_latents() * run.scales.target  # in raw units, as the saved model's
                run.samples.update(latents, batch.context_ids.to(self.device), batch.positions.to(self.device))

    def _save_samples(self, run: Run) -> None:
        """Top-activating contexts with their tokens, under `samples/` (needs a store that can re-read
        its contexts; synthetic stores have none)."""
        make_contexts = getattr(self.store, "make_contexts", None)
        if run.samples is None or make_contexts is None or run.samples.tokens_seen == 0:
            return
        meta = {"model_name": run.cfg.model_name, "source_hook": run.cfg.source_hook,
                "target_hook": run.cfg.target_hook, "prefix_sizes": run.cfg.prefix_sizes, "step": self.step}
        run.files.samples(run.samples, make_contexts, meta)

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

    # ------------------------------------------------------------------ signals
    def _stop_requested(self) -> bool:
        """Whether SIGTERM/SIGINT arrived (on any rank: all ranks must stop at the same step)."""
        if self.reduction.world_size > 1 and self.reduction.max(
                torch.tensor(float(self._stop_signal is not None), device=self.device)):
            self._stop_signal = self._stop_signal or signal.SIGTERM
        return self._stop_signal is not None

    @contextmanager
    def _signals_stop_at_a_step(self):
        """SIGTERM/SIGINT finish the current step, write a checkpoint and stop (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def request_stop(signum, _frame):
            self._stop_signal = signum

        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
