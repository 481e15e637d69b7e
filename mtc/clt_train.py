"""Training a cross-layer transcoder (`python -m mtc train --clt --layers all`): its config, memory plan and store.

A CLT is one run (one run dir, `config.json`, checkpoints, `final/`) whose config names `clt_layers` and hook
templates; the `Trainer` trains it like a transcoder, from a store that serves every layer's source and target
stacked as `[batch, n_layers, d]` (`LayerStack`), so one language-model forward feeds all layers. Resume is the
Trainer's: exact, from the newest complete checkpoint. The whole CLT trains in one pass on one device: its
decoders link every pair of layers, so it cannot be split into passes as a set can; `clt_memory_plan` says
before anything loads whether it fits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .activations import ActivationBatch
from .config import TranscoderConfig
from .errors import UsageError
from .language_model import default_hooks
from .memory import DTYPE_BYTES, GiB, HEADROOM, MemoryPlan, ModelShape, layer_costs, pass_costs

SOURCE_TEMPLATE, TARGET_TEMPLATE = default_hooks("{layer}")  # type: ignore[arg-type]


def clt_config(base: TranscoderConfig, layers: list[int]) -> TranscoderConfig:
    """The CLT over `layers` with `base`'s settings (a set's shared config): every layer's default hook pair."""
    return base.replace(clt_layers=list(layers), source_hook=SOURCE_TEMPLATE, target_hook=TARGET_TEMPLATE,
                        samples_every=0)


def layer_configs(cfg: TranscoderConfig) -> list[TranscoderConfig]:
    """One transcoder config per layer of a CLT: the hook pairs its store reads (and their widths' checks)."""
    return [cfg.replace(clt_layers=[], source_hook=cfg.source_hook.format(layer=layer),
                        target_hook=cfg.target_hook.format(layer=layer), run_name=f"{cfg.run_name}-layer_{layer}")
            for layer in cfg.clt_layers]


class LayerStack:
    """A store for a CLT: the wrapped store serves one hook pair per layer; this serves them stacked, one source
    `[batch, n_layers, d_in]` and one target `[batch, n_layers, d_out]`. Everything else (position, state,
    contexts) is the wrapped store's."""

    def __init__(self, store):
        object.__setattr__(self, "store", store)

    def next_batch(self) -> ActivationBatch:
        batch = self.store.next_batch()
        return ActivationBatch([torch.stack(batch.sources, dim=1)], [torch.stack(batch.targets, dim=1)],
                               batch.context_ids, batch.positions)

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.store, name, value)


# ---------------------------------------------------------------------- memory
def clt_parameters(cfg: TranscoderConfig) -> int:
    """Encoders and biases of every layer, and the decoders of every pair of layers l <= l'."""
    n = len(cfg.clt_layers)
    return n * (cfg.d_in * cfg.d_sae + cfg.d_sae + cfg.d_out) + cfg.d_sae * cfg.d_out * n * (n + 1) // 2


def clt_step_bytes(cfg: TranscoderConfig) -> int:
    """A training step's working set: each layer pair's reconstruction per prefix and its AuxK part, with their
    gradients (kept for backward), and every target's sums (measured: 9.25 GiB peak for a plan of 10.04 GiB, 18
    layers of the offline Gemma-3-270M, 1,024 latents each, batch 512)."""
    n = len(cfg.clt_layers)
    pairs = n * (n + 1) // 2
    return cfg.batch_size * cfg.d_out * 4 * (2 * pairs * (cfg.n_prefixes + 1) + n * (cfg.n_prefixes + 4))


def clt_memory_plan(cfg: TranscoderConfig, shape: ModelShape, device: str, capacity: int,
                    on_cpu: bool = False) -> MemoryPlan:
    """What a CLT's training holds at once (all layers in one pass), from the shapes alone. Raises
    `ValueError` naming the settings to change when it does not fit."""
    n = len(cfg.clt_layers)
    per_pass = pass_costs(cfg, shape, on_cpu)
    param_bytes = clt_parameters(cfg) * DTYPE_BYTES[cfg.dtype]
    per_pass.update({f"CLT parameters ({n * (n + 1) // 2} decoder pairs)": param_bytes, "gradients": param_bytes,
                     "Adam state": 2 * param_bytes,
                     "CLT step (every pair of layers at once)": clt_step_bytes(cfg)})
    per_layer = {name: size for name, size in layer_costs(cfg, shape).items()
                 if name not in ("transcoder parameters", "gradients", "Adam state")}
    plan = MemoryPlan(device, capacity, per_pass, per_layer, list(cfg.clt_layers), [list(cfg.clt_layers)],
                      hint="lower --buffer-tokens")
    need = sum(per_pass.values()) + n * sum(per_layer.values())
    if need > plan.usable:
        raise ValueError(
            f"memory: this CLT needs about {need / GiB:.2f} GiB, more than {HEADROOM:.0%} of {device} (its parameters "
            f"with gradients and Adam state are {4 * param_bytes / GiB:.2f} GiB: they grow with d_sae and the square "
            f"of the layers). Lower d_sae (now {cfg.d_sae:,}), batch_size (now {cfg.batch_size:,}: a step holds every "
            f"target's reconstructions), train fewer --layers, or lower buffer_tokens (now {cfg.buffer_tokens:,})")
    return plan


# ---------------------------------------------------------------------- the launch
def train_clt_command(args) -> int:
    """`train --clt --layers ...`: the CLT's config from the flags as a set's (`mtc.launch.set_config`), its memory
    plan, then (unless `--dry-run`) training as one run."""
    from .colab import resolve_mirror_dir
    from .config import resolve_device
    from .launch import check_widths, run_and_report, set_config
    from .launch_checks import check_before_model
    from .language_model import load_language_model
    from .lock import hold
    from .memory import device_capacity
    from .parallel import launched_by_torchrun, store_for, Process
    from .resume import decide_resume
    from .sets import parse_layers
    from .train import Trainer

    if args.layers is None or hasattr(args, "clt_layers"):
        raise UsageError("--clt needs --layers (all, A-B or A,B,C): the layers the cross-layer transcoder spans "
                         "(not --clt-layers)")
    if launched_by_torchrun():
        raise UsageError("--clt trains in one process for now; run it without torchrun")
    base, shape = set_config(args)
    if not hasattr(args, "run_name"):  # as a set is named <name>-set, a CLT is <name>-clt unless named
        base = base.replace(run_name=base.run_name.removesuffix("-set") + "-clt")
    try:
        cfg = clt_config(base, parse_layers(args.layers, shape.n_layers))
    except ValueError as err:
        raise UsageError(str(err)) from None
    device = resolve_device(cfg.device)
    try:
        plan = clt_memory_plan(cfg, shape, *device_capacity(device, args.memory),
                               on_cpu=device == "cpu" and not args.memory)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(plan.format().replace(" pass(es) of up to", " pass of"))
    print(f"run_dir: {cfg.run_dir}")
    if args.dry_run:
        return 0
    mirror = resolve_mirror_dir(cfg.drive_dir, cfg.run_name)
    check_before_model([cfg])
    resume = decide_resume([cfg], args.resume, [mirror])
    process = Process(device=device)
    with hold([cfg.run_dir]):
        bridge = load_language_model(cfg.model_name, device=device, dtype=cfg.model_dtype)
        check_widths(layer_configs(cfg), bridge, shape)
        print(f"{cfg.run_name}: cross-layer transcoder over layers {cfg.clt_layers[0]}..{cfg.clt_layers[-1]}, "
              f"d_sae={cfg.d_sae} per layer, prefixes={cfg.prefix_sizes}, k={cfg.k} per layer, "
              f"{cfg.total_steps} steps of {cfg.batch_size} tokens on {device}", file=sys.stderr)
        store, _ = store_for(bridge, layer_configs(cfg), process)
        trainer = Trainer([cfg], LayerStack(store), device=device, mirror_dirs=[mirror], resume=resume,
                          progress=not args.no_progress, process=process)
        return run_and_report(trainer.train, lambda: trainer.runs)


def load_clt(path: str | Path, device: str = "cpu"):
    """A trained CLT from its run dir (`final/`, else the newest checkpoint) or model folder."""
    from .checkpoint import load, model_folder

    model = load(model_folder(path)[0], device=device)
    if not model.cfg.clt_layers:
        raise ValueError(f"{path} holds a transcoder, not a cross-layer transcoder (train one with --clt)")
    return model
