"""What a training process writes for one run: `config.json`, metrics (and W&B), checkpoints, activation samples,
`final/`, and their copies on the mirror (the run-dir layout of the design brief).

The `Trainer` hands all of it to one object per run: `RunFiles` in the process that writes (the only process, or
rank 0 under `torchrun`), `NoFiles` in the others, which train identically and write nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from .checkpoint import clean_temporaries, prune_checkpoints, save, write_checkpoint
from .config import TranscoderConfig
from .logger import METRICS_FILE, RunLogger, truncate_metrics
from .mirror import Mirror
from .samples import SampleCollector, context_lookup
from .scaling import ActivationScales
from .transcoder import MatryoshkaTranscoder


class NoFiles:
    """A run's files in a process that writes none: every method does nothing."""

    writes = False
    message = ""

    def clean(self) -> None:
        """Remove what interrupted writes left in the run dir and on the mirror."""

    def open(self, resumed: bool) -> None:
        """Create the run dir, write `config.json` and open the metrics log (continued when `resumed`)."""

    def resumed_from(self, checkpoint: Path, step: int) -> None:
        """A run continues from `checkpoint` at `step`: bring the mirror's history back, drop later metrics."""

    def log(self, metrics: dict) -> None:
        """Append one line of metrics."""

    def checkpoint(self, step: int, model: MatryoshkaTranscoder, state: Callable[[], dict], meta: dict,
                   scales: ActivationScales) -> None:
        """Write checkpoint `step` (`state()` builds the trainer state), prune old ones, mirror it."""

    def samples(self, collector: SampleCollector, make_contexts, meta: dict) -> None:
        """Save the top-activating contexts (and mirror them)."""

    def final(self, model: MatryoshkaTranscoder, scales: ActivationScales) -> None:
        """Write `final/` (raw units) and mirror it."""

    def close(self) -> None:
        """Wait for the mirror's copies and close the metrics log."""


class RunFiles(NoFiles):
    """The files of `cfg.run_dir` and its mirror, written by this process."""

    writes = True

    def __init__(self, cfg: TranscoderConfig, mirror: Mirror):
        self.cfg, self.run_dir, self.mirror = cfg, cfg.run_dir, mirror
        self.logger: RunLogger | None = None

    @property
    def message(self) -> str:
        return self.logger.message if self.logger is not None else ""

    def clean(self) -> None:
        clean_temporaries(self.run_dir)
        self.mirror.clean()

    def open(self, resumed: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.run_dir / "config.json")
        self.logger = RunLogger(self.cfg, self.run_dir, resume=resumed)

    def resumed_from(self, checkpoint: Path, step: int) -> None:
        if self.mirror.holds(checkpoint):
            self.mirror.fetch_history()
        truncate_metrics(self.run_dir, step)

    def log(self, metrics: dict) -> None:
        self.logger.log(metrics)

    def checkpoint(self, step: int, model: MatryoshkaTranscoder, state: Callable[[], dict], meta: dict,
                   scales: ActivationScales) -> None:
        path = write_checkpoint(self.run_dir, step, model, state(), meta, scales)
        self.mirror.wait()  # the background copy may still be reading an older checkpoint
        prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        self.logger.log_checkpoint(path, step)
        self.mirror.copy([(path, f"checkpoints/{path.name}"), (self.run_dir / METRICS_FILE, METRICS_FILE),
                          (self.run_dir / "config.json", "config.json")], prune=True)

    def samples(self, collector: SampleCollector, make_contexts, meta: dict) -> None:
        path = collector.save(self.run_dir / "samples", context_lookup(make_contexts), meta=meta)
        self.mirror.copy([(path, "samples")], prune=False)

    def final(self, model: MatryoshkaTranscoder, scales: ActivationScales) -> None:
        tmp, final = self.run_dir / ".tmp-final", self.run_dir / "final"
        save(model, tmp, scales)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self.mirror.copy([(final, "final")], prune=False)

    def close(self) -> None:
        self.mirror.wait()
        if self.logger is not None:
            self.logger.finish()
            self.logger = None
