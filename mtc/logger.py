"""Metrics logging: every logged step goes to `metrics.jsonl` in the run dir, and to W&B when enabled.

W&B never prompts and never hangs: "auto" logs online only when an API key is available
(`WANDB_API_KEY` or a saved `wandb login`), otherwise offline into the run dir, and says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
from pathlib import Path

from .config import TranscoderConfig

METRICS_FILE = "metrics.jsonl"


def wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check_wandb_key(requested: str) -> None:
    """`wandb_mode="online"` without an API key would make wandb prompt (and wait for ever on a terminal)
    or fail deep inside `wandb.init`; refuse it up front with the fixes."""
    if requested == "online" and not wandb_key_available():
        from .errors import UsageError

        raise UsageError("wandb_mode: online needs a W&B API key and none was found; set WANDB_API_KEY (in Colab: "
                         "Secrets), run `wandb login`, or use --wandb-mode offline (upload later with `wandb sync`)")


def choose_wandb_mode(requested: str) -> tuple[str, str]:
    """(mode, one-line explanation) for a config's `wandb_mode`."""
    if requested != "auto":
        return requested, f"W&B: {requested} (wandb_mode={requested})"
    if wandb_key_available():
        return "online", "W&B: online (API key found)"
    return "offline", ("W&B: offline, no API key found (set WANDB_API_KEY or run `wandb login` to log "
                       "online; `wandb sync` uploads offline runs later)")


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop lines logged after `after_step`: a resumed run logs those steps again."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every metrics line of a run, for plots without W&B."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class RunLogger:
    """Writes one run's metrics lines; mirrors them to W&B when a W&B run is open."""

    def __init__(self, cfg: TranscoderConfig, run_dir: Path, resume: bool):
        self.run_dir = Path(run_dir)
        check_wandb_key(cfg.wandb_mode)
        self.mode, self.message = choose_wandb_mode(cfg.wandb_mode)
        self.wandb_run = None
        self.log_checkpoints = cfg.wandb_log_checkpoints and self.mode == "online"
        if self.mode != "disabled":
            import wandb

            # the id is stable per run dir so a resumed run continues the same W&B run
            run_id = cfg.run_name + "-" + hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:8]
            try:
                self.wandb_run = wandb.init(
                    project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=cfg.run_name,
                    config=cfg.to_dict(), dir=str(self.run_dir), mode=self.mode, id=run_id,
                    resume="allow" if resume else None, reinit="create_new",
                    settings=wandb.Settings(console="off", silent=True),
                )
            except Exception as err:  # a rejected key, an unknown entity, no network: wandb's own error types
                raise RuntimeError(f"wandb_mode: W&B could not start in {self.mode} mode ({err}); check "
                                   f"WANDB_API_KEY, wandb_entity and wandb_project, or use --wandb-mode offline "
                                   f"(upload later with `wandb sync`)") from err

    def log(self, metrics: dict) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=metrics["step"])

    def log_checkpoint(self, path: Path, step: int) -> None:
        if self.log_checkpoints and self.wandb_run is not None:
            import wandb

            artifact = wandb.Artifact(f"{self.run_dir.name}-checkpoint", type="model", metadata={"step": step})
            artifact.add_dir(str(path))
            self.wandb_run.log_artifact(artifact, aliases=["latest", f"step_{step}"])

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
