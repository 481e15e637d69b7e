"""Attribution graphs from a transcoder set or a cross-layer transcoder, through circuit-tracer.

circuit-tracer 0.5.0 pins transformers 4.57 and an older transformer-lens, so it lives in its own
virtualenv (`python -m mtc attribute --install .venv-circuit-tracer`: torch first, then
`circuit-tracer==0.5.0 nnsight==0.7.0`; nnsight 0.8 breaks circuit-tracer 0.5.0's import). This module
has two halves:

* the circuit-tracer half runs *inside* that venv as a script (`python mtc/attribution.py ...`, so it
  imports nothing from mtc): it loads the exported set or CLT (`mtc export circuit-tracer`), builds circuit-tracer's
  `ReplacementModel` with the **nnsight backend** (its TransformerLens backend shares rotary buffers across
  layers and is wrong for Gemma-3), runs `attribute()` on a prompt, saves the graph, prunes it with
  circuit-tracer's own `prune_graph` and scores it with `compute_graph_scores` (replacement and
  completeness), and writes every transcoder's activations on the prompt;
* the mtc half (`attribute_set`, `mtc_latents`, `python -m mtc attribute`) launches it and computes the
  same latents with mtc, so the two can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VENV_ENV = "MTC_CIRCUIT_TRACER_PYTHON"
DEFAULT_VENV = ".venv-circuit-tracer"
CIRCUIT_TRACER = ("circuit-tracer==0.5.0", "nnsight==0.7.0")
SUMMARY, GRAPH, ACTIVATIONS = "summary.json", "graph.pt", "activations.safetensors"


# ---------------------------------------------------------------------- inside circuit-tracer's venv
def load_transcoders(folder: Path):
    """circuit-tracer's `TranscoderSet` from an mtc export: `config.yaml` lists the layer files relative to
    the folder (circuit-tracer itself reads local paths relative to the working directory); or its
    `CrossLayerTranscoder` from a CLT export."""
    import torch
    import yaml
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    config = yaml.safe_load((folder / "config.yaml").read_text())
    if config.get("model_kind") == "cross_layer_transcoder":  # `mtc export circuit-tracer` of a CLT
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(str(folder), feature_input_hook=config["feature_input_hook"],
                        feature_output_hook=config["feature_output_hook"], scan=config["scan"],
                        device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
    paths = {layer: str(folder / name) for layer, name in enumerate(config["transcoders"])}
    return load_transcoder_set(paths, scan=config["scan"], feature_input_hook=config["feature_input_hook"],
                               feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"),
                               lazy_encoder=False, lazy_decoder=False)


def run_circuit_tracer(model_path: str, folder: Path, prompt: str, out: Path, max_n_logits: int,
                       max_feature_nodes: int, batch_size: int, node_threshold: float, edge_threshold: float) -> dict:
    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model = ReplacementModel.from_pretrained_and_transcoders(model_path, load_transcoders(folder), backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    _, activations = model.get_activations(prompt)  # [layers, positions, d_transcoder]
    save_file({"activations": activations.float().contiguous()}, str(out / ACTIVATIONS))
    graph = attribute(prompt, model, max_n_logits=max_n_logits, max_feature_nodes=max_feature_nodes,
                      batch_size=batch_size)
    graph.to_pt(str(out / GRAPH))
    replacement, completeness = compute_graph_scores(graph)
    pruned = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    n_features = len(graph.selected_features)
    summary = {
        "prompt": prompt, "tokens": graph.input_tokens.tolist(), "scan": graph.scan,
        "replacement_score": replacement, "completeness_score": completeness,
        "active_features": int(graph.active_features.shape[0]), "feature_nodes": n_features,
        "nodes": int(pruned.node_mask.numel()), "nodes_after_pruning": int(pruned.node_mask.sum()),
        "feature_nodes_after_pruning": int(pruned.node_mask[:n_features].sum()),
        "edges_after_pruning": int(pruned.edge_mask.sum()),
        "feature_nodes_by_layer": torch.bincount(  # the pruned graph's features: active_features rows are (layer, pos, index)
            graph.active_features[graph.selected_features[pruned.node_mask[:n_features].cpu()]][:, 0],
            minlength=graph.cfg.n_layers).tolist(),
        "node_threshold": node_threshold, "edge_threshold": edge_threshold,
        "files": {"graph": GRAPH, "activations": ACTIVATIONS},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


GRAPH_OPTIONS = [  # (flag, type, default, help): the graph's settings, the same in the script and the CLI
    ("--max-n-logits", int, 5, "logit nodes attributed"),
    ("--max-feature-nodes", int, 500, "feature nodes kept in the graph"),
    ("--batch-size", int, 64, "source nodes per backward pass"),
    ("--node-threshold", float, 0.8, "circuit-tracer's prune_graph: share of influence kept by nodes"),
    ("--edge-threshold", float, 0.98, "circuit-tracer's prune_graph: share of influence kept by edges"),
]


def add_graph_options(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, text in GRAPH_OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")


def graph_options(args: argparse.Namespace) -> list[str]:
    return [f"{flag}={getattr(args, flag[2:].replace('-', '_'))}" for flag, *_ in GRAPH_OPTIONS]


def script_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="circuit-tracer's attribution graph of an mtc transcoder set")
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder (or hub id)")
    parser.add_argument("--set", required=True, help="a folder written by `python -m mtc export circuit-tracer`")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="folder for graph.pt, activations.safetensors, summary.json")
    add_graph_options(parser)
    return parser


# ---------------------------------------------------------------------- in mtc's environment
def circuit_tracer_python(python: str | None = None) -> str:
    """The python of circuit-tracer's venv: `python`, else `$MTC_CIRCUIT_TRACER_PYTHON`, else
    `.venv-circuit-tracer/bin/python` in the working directory."""
    candidate = python or os.environ.get(VENV_ENV) or str(Path(DEFAULT_VENV) / "bin" / "python")
    if not Path(candidate).is_file():
        raise FileNotFoundError(f"circuit-tracer's python {candidate} does not exist. circuit-tracer needs its own "
                                f"virtualenv (it pins transformers 4.57): build one with `python -m mtc attribute "
                                f"--install {DEFAULT_VENV}`, or pass --python / set {VENV_ENV}")
    return candidate


def install_venv(path: str | Path, torch_spec: str | None = None) -> Path:
    """Create circuit-tracer's virtualenv at `path` (reused when it already imports circuit_tracer): torch
    first (`torch_spec`, default this environment's torch version, so no other build is pulled), then
    circuit-tracer and nnsight. Returns its python."""
    import torch

    path = Path(path)
    python = path / "bin" / "python"
    if python.is_file() and subprocess.run([str(python), "-c", "import circuit_tracer"],
                                           capture_output=True).returncode == 0:
        return python
    spec = torch_spec or f"torch=={torch.__version__.split('+')[0]}"
    for command in ([sys.executable, "-m", "venv", str(path)], [str(python), "-m", "pip", "install", "-q", spec],
                    [str(python), "-m", "pip", "install", "-q", *CIRCUIT_TRACER]):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n"
                               f"{(result.stdout + result.stderr)[-3000:]}")
    return python


def attribute_set(export: str | Path, model_name: str, prompt: str, out: str | Path, python: str | None = None,
                  options: list[str] = ()) -> dict:
    """Run circuit-tracer on the exported set `export` for `prompt` (in its venv); returns its summary."""
    from .language_model import resolve_model_path

    command = [circuit_tracer_python(python), str(Path(__file__).resolve()), "--model", resolve_model_path(model_name),
               "--set", str(Path(export).resolve()), "--prompt", prompt, "--out", str(Path(out).resolve()), *options]
    env = {**os.environ, "PYTHONPATH": ""}  # nothing of mtc's environment leaks into the venv
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"circuit-tracer failed on {export} (exit {result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-4000:]}")
    return json.loads((Path(out) / SUMMARY).read_text())


def mtc_latents(export: str | Path, model_name: str, prompt: str):
    """mtc's own latents of every layer of `export` (a set's or a CLT's) on `prompt`, `[layers, positions, d_sae]`,
    computed from the bridge's hooks with the BOS that circuit-tracer's tokenizer call adds."""
    import torch

    from .clt_interop import is_clt_export, load_circuit_tracer_clt
    from .interop import load_export
    from .language_model import load_language_model

    bridge = load_language_model(model_name)
    tokens = bridge.tokenizer(prompt, return_tensors="pt").input_ids
    if is_clt_export(export):
        clt = load_circuit_tracer_clt(export)
        hooks = [clt.cfg.source_hook.format(layer=layer) for layer in clt.cfg.clt_layers]
        with torch.no_grad():
            _, cache = bridge.run_with_cache(tokens, names_filter=hooks)
            return clt.encode(torch.stack([cache[hook][0] for hook in hooks], dim=1)).transpose(0, 1)
    models = {}
    layer = 0
    while (Path(export) / f"layer_{layer}.safetensors").is_file():
        models[layer] = load_export(export, layer=layer)
        layer += 1
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=[m.cfg.source_hook for m in models.values()])
    return torch.stack([model.encode(cache[model.cfg.source_hook][0]) for model in models.values()])


def add_attribute_parser(commands) -> None:
    attribute = commands.add_parser("attribute", help="an attribution graph of a transcoder set with circuit-tracer",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    attribute.add_argument("--install", metavar="VENV", help="create circuit-tracer's virtualenv here, then stop")
    attribute.add_argument("--set", help="a folder written by `python -m mtc export circuit-tracer`")
    attribute.add_argument("--model", help="the language model (hub id, local folder or gemma-3-270m-offline)")
    attribute.add_argument("--prompt")
    attribute.add_argument("--out", help="folder for graph.pt, activations.safetensors and summary.json")
    attribute.add_argument("--python", help=f"circuit-tracer's python (default ${VENV_ENV} or {DEFAULT_VENV})")
    add_graph_options(attribute)


def attribute_command(args: argparse.Namespace) -> int:
    from .errors import UsageError

    if args.install:
        print(f"circuit-tracer's python: {install_venv(args.install)}")
        return 0
    missing = [f"--{name}" for name in ("set", "model", "prompt", "out") if not getattr(args, name)]
    if missing:
        raise UsageError(f"attribute needs {', '.join(missing)} (or --install VENV to build circuit-tracer's venv)")
    summary = attribute_set(args.set, args.model, args.prompt, args.out, args.python, graph_options(args))
    print(f"{args.set}: replacement score {summary['replacement_score']:.3f}, completeness score "
          f"{summary['completeness_score']:.3f}, {summary['feature_nodes_after_pruning']} of "
          f"{summary['feature_nodes']} feature nodes kept by pruning; wrote {args.out}")
    return 0


if __name__ == "__main__":  # inside circuit-tracer's venv
    parsed = script_parser().parse_args()
    run_circuit_tracer(parsed.model, Path(parsed.set), parsed.prompt, Path(parsed.out), parsed.max_n_logits,
                       parsed.max_feature_nodes, parsed.batch_size, parsed.node_threshold, parsed.edge_threshold)
