"""Transcoder sets: one transcoder per layer of a model, trained from shared language-model passes.

A set is one folder: `set.json` (the shared settings and the layers) and, per layer, an ordinary run
dir `layer_<L>/` (config.json, checkpoints/, metrics.jsonl, final/) whose transcoder maps that layer's
default hook pair (`blocks.L.ln2.hook_normalized` -> `blocks.L.hook_mlp_out`). The layers are trained in
passes (see `mtc.memory`): the layers of one pass share every language-model forward and one checkpoint
cadence. A layer's training does not depend on which layers share its pass (same data order, same
initialisation), so a set trained in one pass equals the same set trained in several.

Resuming a set: finished layers (with `final/`) are kept, the layers of an interrupted pass continue
together from their newest common checkpoint, and the layers not started are planned afresh for the
device at hand.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import WEIGHTS_FILE, atomic_write_bytes, config_differences, run_checkpoints
from .config import TranscoderConfig
from .language_model import default_hooks
from .memory import describe_layers
from .parallel import Process, held_by_every_rank, split, store_for
from .resume import ResumePoint, decide_resume

SET_FILE = "set.json"
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Layers named by `--layers`: `all`, a range `A-B` (inclusive), a list `A,B,C`, or a mix (`0-3,7`)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        found = _RANGE.match(part)
        if found:
            first, last = int(found.group(1)), int(found.group(2))
            if last < first:
                raise ValueError(f"--layers {spec!r}: range {part} runs backwards; write {last}-{first}")
            layers.extend(range(first, last + 1))
        elif part.isdigit():
            layers.append(int(part))
        else:
            raise ValueError(f"--layers {spec!r}: {part!r} is not a layer; use all, A-B or A,B,C (e.g. 0-5,9)")
    if not layers:
        raise ValueError(f"--layers {spec!r} names no layer; use all, A-B or A,B,C")
    out_of_range = [layer for layer in layers if layer >= n_layers]
    if out_of_range:
        raise ValueError(f"--layers {spec!r}: layer(s) {out_of_range} out of range; this model has layers "
                         f"0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"--layers {spec!r} names a layer twice")
    return sorted(layers)


def layer_dir(set_dir: str | Path, layer: int) -> Path:
    return Path(set_dir) / f"layer_{layer}"


def is_set(path: str | Path) -> bool:
    return (Path(path) / SET_FILE).is_file()


@dataclass
class TranscoderSet:
    """The settings of a set: `config` holds everything the layers share (its hooks are replaced per layer;
    its `output_dir`/`run_name` name the set's folder), `layers` the layers trained."""

    config: TranscoderConfig
    layers: list[int]

    @property
    def set_dir(self) -> Path:
        return self.config.run_dir

    def layer_config(self, layer: int) -> TranscoderConfig:
        source, target = default_hooks(layer)
        return self.config.replace(source_hook=source, target_hook=target, output_dir=str(self.set_dir),
                                   run_name=f"layer_{layer}")

    def mirror_dir(self, layer: int, mirror_root: Path | None) -> Path | None:
        """Where `layer`'s checkpoints are mirrored, under the set's own mirror folder."""
        return None if mirror_root is None else Path(mirror_root) / f"layer_{layer}"

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"layers": self.layers, "config": self.config.to_dict()}

    def save(self) -> Path:
        self.set_dir.mkdir(parents=True, exist_ok=True)
        path = self.set_dir / SET_FILE
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, set_dir: str | Path) -> TranscoderSet:
        path = Path(set_dir) / SET_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {set_dir} is not a transcoder set (train one with "
                                    f"`python -m mtc train --layers all`)")
        try:
            data = json.loads(path.read_text())
            return cls(TranscoderConfig.from_dict(data["config"]), [int(layer) for layer in data["layers"]])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); restore it from the mirror "
                             f"or a copy") from None

    def check_matches(self, saved: TranscoderSet) -> None:
        """Raise `ValueError` when this set's settings would continue `saved` (in the same folder) into a
        different set."""
        if saved.layers != self.layers:
            raise ValueError(f"--layers: {self.set_dir} is a set of layers {saved.layers}, not {self.layers}; "
                             f"resume it with the same --layers, or choose a new --run-name")
        differences = config_differences(saved.config, self.config)
        if differences:
            raise ValueError(f"{self.set_dir} holds a set trained with other settings: " + "; ".join(differences)
                             + ". Use the set's own settings (its set.json), or a new --run-name")

    # ------------------------------------------------------------------ progress
    def finished(self, layer: int, mirror_root: Path | None = None, fetch: bool = True) -> bool:
        """Whether `layer` has its `final/`, here or on the mirror (fetched back unless `fetch` is False)."""
        final = layer_dir(self.set_dir, layer) / "final"
        if (final / WEIGHTS_FILE).is_file():
            return True
        mirrored = self.mirror_dir(layer, mirror_root)
        if mirrored is not None and (mirrored / "final" / WEIGHTS_FILE).is_file():
            if fetch:
                shutil.copytree(mirrored / "final", final, dirs_exist_ok=True)
            return True
        return False

    def started(self, layer: int, mirror_root: Path | None = None) -> bool:
        return bool(run_checkpoints(layer_dir(self.set_dir, layer), self.mirror_dir(layer, mirror_root)))

    def progress(self, mirror_root: Path | None = None, fetch: bool = True) -> tuple[list[int], list[int], list[int]]:
        """(finished, interrupted, not started) layers."""
        finished = [layer for layer in self.layers if self.finished(layer, mirror_root, fetch)]
        interrupted = [layer for layer in self.layers if layer not in finished and self.started(layer, mirror_root)]
        fresh = [layer for layer in self.layers if layer not in finished and layer not in interrupted]
        return finished, interrupted, fresh


def agree_on_checkpoints(run_dirs: list[Path], mirror_dirs: list[Path | None]) -> None:
    """Before a layer-parallel pass resumes, set aside (as `checkpoints/.unmatched-step_<N>`) every checkpoint
    newer than the newest step that all ranks hold for all their layers: a rank killed while writing leaves
    that step incomplete for the set, and all ranks must continue from the same step."""
    held = [set(run_checkpoints(run_dir, mirror)) for run_dir, mirror in zip(run_dirs, mirror_dirs)]
    newest = max(held_by_every_rank(set.intersection(*held) if held else set()), default=-1)
    for folder in [*run_dirs, *mirror_dirs]:
        for step, path in (run_checkpoints(folder) if folder is not None else {}).items():
            if step > newest:
                print(f"note: {path} is set aside as .unmatched-{path.name}: another rank has no checkpoint of "
                      f"that step", file=sys.stderr)
                path.rename(path.with_name(f".unmatched-{path.name}"))


def pass_share(layers: list[int], process: Process) -> list[int]:
    """The layers of a pass this process trains: all of them, or under torchrun its contiguous share (the split
    `mtc.parallel.store_for` makes)."""
    return split(layers, process.world)[process.rank]


def decide_pass_resume(tset: TranscoderSet, layers: list[int], process: Process, mirror_root: Path | None,
                       resume: str) -> ResumePoint | None:
    """Where this process's layers of a pass continue from (`mtc.resume.decide_resume`); under torchrun the ranks
    first agree on a step all of them hold."""
    mine = pass_share(layers, process)
    mirrors = [tset.mirror_dir(layer, mirror_root) for layer in mine]
    if process.world > 1:
        agree_on_checkpoints([layer_dir(tset.set_dir, layer) for layer in mine], mirrors)
    return decide_resume([tset.layer_config(layer) for layer in mine], resume, mirrors)


def train_set(tset: TranscoderSet, passes: list[list[int]], resumes: list[ResumePoint | None], bridge,
              process: Process, mirror_root: Path | None, progress: bool = True) -> list:
    """Train `passes` (lists of layers of `tset`) one after another, each from its resume point (`resumes`, see
    `decide_pass_resume`); returns the `mtc.train.Run` of every layer this process trained. The layers of a pass
    share one activation store, so one language-model forward feeds them all; under `torchrun` each rank trains
    its share of every pass and writes its layers' run dirs itself (layer-parallel, see `mtc.parallel`)."""
    from .train import Trainer

    if process.writer:
        tset.save()
    runs = []
    for number, (layers, resume) in enumerate(zip(passes, resumes), 1):
        start = time.perf_counter()
        configs = [tset.layer_config(layer) for layer in layers]  # widths checked by the launch (mtc.launch)
        store, my_configs = store_for(bridge, configs, process, layer_parallel=True)
        mirrors = [tset.mirror_dir(layer, mirror_root) for layer in pass_share(layers, process)]
        if process.writer:
            shares = " | ".join(describe_layers(share) for share in split(layers, process.world))
            print(f"pass {number}/{len(passes)}: layers {describe_layers(layers)}"
                  + (f" ({process.world} ranks: {shares})" if process.world > 1 else ""), file=sys.stderr)
        # no `process`: each rank trains its own layers on whole batches and writes their run dirs itself
        trainer = Trainer(my_configs, store, device=process.device, resume=resume,
                          progress=progress and process.writer, mirror_dirs=mirrors)
        trainer.train()
        runs.extend(trainer.runs)
        if process.writer:
            print(f"pass {number}/{len(passes)} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return runs


def load_set(set_dir: str | Path, device: str = "cpu") -> dict:
    """`{layer: MatryoshkaTranscoder}` of a set, each from its `final/` (raw units, ready to export)."""
    from .checkpoint import load

    tset = TranscoderSet.load(set_dir)
    missing = [layer for layer in tset.layers if not (layer_dir(set_dir, layer) / "final" / WEIGHTS_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{set_dir}: layer(s) {missing} have no final/ yet; finish training the set "
                                f"(run the same `python -m mtc train --layers ...` again: --resume auto continues it)")
    return {layer: load(layer_dir(set_dir, layer) / "final", device=device) for layer in tset.layers}
