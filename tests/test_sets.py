"""Transcoder sets: `train --layers`, the memory plan, resuming between passes, and exports at a prefix."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtc.checkpoint import load
from mtc.cli import main
from mtc.config import TranscoderConfig
from mtc.errors import UsageError
from mtc.export import export
from mtc.interop import load_export
from mtc.memory import (GiB, HEADROOM, ModelShape, layer_costs, memory_plan, model_shape, pass_costs,
                        transcoder_parameters)
from mtc.sets import TranscoderSet, load_set, parse_layers
from mtc.transcoder import MatryoshkaTranscoder


def set_args(model_dir, out, *extra, steps=12, name="s"):
    """`mtc.cli.main` arguments for a quick set on a tiny model (4-step checkpoints, no W&B/mirror)."""
    return ["train", "--layers", "all", "--model-name", str(model_dir), "--d-sae", "48", "--prefix-sizes", "16", "48",
            "--k", "4", "--k-aux", "16", "--batch-size", "32", "--total-tokens", str(32 * steps), "--warmup-steps", "2",
            "--seq-len", "16", "--buffer-tokens", "256", "--model-batch-size", "8", "--checkpoint-every", "4",
            "--log-every", "4", "--drive-dir", "none", "--output-dir", str(out), "--run-name", name,
            "--dataset", "pydoc", "--no-progress", "--wandb-mode", "disabled", "--samples-every", "0", *extra]


def weights(set_dir):
    return {layer: model.state_dict() for layer, model in load_set(set_dir).items()}


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for layer in a:
        for name in a[layer]:
            assert torch.equal(a[layer][name], b[layer][name]), (layer, name)


def one_layer_per_pass(model_dir) -> str:
    """A `--memory` in GB that fits the language model and exactly one layer of `set_args`."""
    args = dict(d_in=64, d_out=64, d_sae=48, prefix_sizes=[16, 48], k=4, k_aux=16, batch_size=32, seq_len=16,
                buffer_tokens=256, model_batch_size=8, samples_every=0, total_tokens=32 * 12, warmup_steps=2)
    cfg = TranscoderConfig(**args)
    shape = model_shape(str(model_dir))
    need = sum(pass_costs(cfg, shape).values()) + 1.5 * sum(layer_costs(cfg, shape).values())
    return f"{need / HEADROOM / GiB:.9f}"


# ---------------------------------------------------------------------- layers and plan
@pytest.mark.parametrize("spec, expected", [("all", [0, 1, 2, 3]), ("1-3", [1, 2, 3]), ("0,2", [0, 2]),
                                            ("0-1,3", [0, 1, 3]), (" 2 ", [2])])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec, named", [("4", "out of range"), ("3-1", "backwards"), ("x", "'x'"), ("1,1", "twice"),
                                         (",", "names no layer")])
def test_parse_layers_refuses_with_the_reason(spec, named):
    with pytest.raises(ValueError, match=named):
        parse_layers(spec, 4)


def test_model_shape_counts_gemma2_2b_and_local_folders(tiny_dirs):
    assert model_shape("google/gemma-2-2b").n_params == 2_614_341_888  # the published count
    shape = model_shape(str(tiny_dirs["gemma2"]))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gemma2"])
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    config = json.loads((tiny_dirs["gemma2"] / "config.json").read_text())
    assert ModelShape.from_hf_config(config).n_params == shape.n_params  # the formula, without the files
    assert (shape.n_layers, shape.d_model) == (3, 64)


def test_memory_plan_counts_the_transcoder_and_splits_evenly():
    cfg = TranscoderConfig(d_in=2304, d_out=2304, d_sae=16384, k=96, batch_size=4096, buffer_tokens=262_144,
                           activation_dtype="float16", model_dtype="float16")
    shape = model_shape("google/gemma-2-2b")
    costs = layer_costs(cfg, shape)
    for skip in (False, True):
        small = TranscoderConfig(d_in=8, d_out=6, d_sae=16, k=4, skip_connection=skip)
        assert transcoder_parameters(small) == sum(p.numel() for p in MatryoshkaTranscoder(small).parameters())
    assert costs["transcoder parameters"] == (2 * 2304 * 16384 + 16384 + 2304) * 4
    assert costs["Adam state"] == 2 * costs["transcoder parameters"]
    assert costs["activation buffer, source hook (2304 wide)"] == (262_144 + 128) * 2304 * 2
    assert costs["calibration batches (end of run)"] == 32_768 * (2304 + 2304) * 2  # 8 batches of 4,096, float16
    assert "Python, torch and libraries" in pass_costs(cfg, shape, on_cpu=True)
    assert "Python, torch and libraries" not in pass_costs(cfg, shape)  # a GPU plan
    fixed, per_layer = sum(pass_costs(cfg, shape).values()), sum(costs.values())
    capacity = int((fixed + 7.5 * per_layer) / HEADROOM)  # room for 7 layers
    plan = memory_plan(cfg, shape, list(range(26)), "test", capacity)
    assert plan.layers_per_pass == 7
    assert [len(p) for p in plan.passes] == [7, 7, 6, 6]
    assert sum(plan.passes, []) == list(range(26))
    assert "4 pass(es) of up to 7 layers" in plan.format()
    with pytest.raises(ValueError, match="buffer_tokens"):
        memory_plan(cfg, shape, list(range(26)), "test", int(fixed + 0.5 * per_layer))
    on_two = memory_plan(cfg, shape, list(range(26)), "test", capacity, ranks=2)  # layer-parallel: 7 per device
    assert [len(p) for p in on_two.passes] == [13, 13] and on_two.layers_per_pass == 7
    with pytest.raises(ValueError, match="fewer processes"):
        memory_plan(cfg, shape, list(range(3)), "test", capacity, ranks=4)


# ---------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def one_pass_set(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("set")
    assert main(set_args(tiny_dirs["gemma2"], out)) == 0
    return out / "s"


def test_set_trains_every_layer_in_one_folder(one_pass_set, capsys):
    tset = TranscoderSet.load(one_pass_set)
    assert tset.layers == [0, 1, 2]
    for layer, model in load_set(one_pass_set).items():
        cfg = model.cfg
        assert (cfg.source_hook, cfg.target_hook) == (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
        assert (one_pass_set / f"layer_{layer}" / "metrics.jsonl").is_file()
        steps = sorted(p.name for p in (one_pass_set / f"layer_{layer}" / "checkpoints").iterdir())
        assert steps == ["step_12", "step_8"]  # one checkpoint cadence for the set


def test_set_trained_in_several_passes_equals_one_pass(one_pass_set, tiny_dirs, tmp_path, capsys):
    assert main(set_args(tiny_dirs["gemma2"], tmp_path, "--memory", one_layer_per_pass(tiny_dirs["gemma2"]))) == 0
    printed = capsys.readouterr()
    assert "3 pass(es) of up to 1 layers" in printed.out
    assert "pass 3/3" in printed.err
    assert_same_weights(weights(one_pass_set), weights(tmp_path / "s"))


def test_set_resumes_an_interrupted_pass_and_the_passes_not_started(one_pass_set, tiny_dirs, tmp_path, capsys):
    set_dir = tmp_path / "s"
    shutil.copytree(one_pass_set, set_dir)
    shutil.rmtree(set_dir / "layer_1" / "final")  # stopped after its last checkpoint
    shutil.rmtree(set_dir / "layer_2" / "final")
    shutil.rmtree(set_dir / "layer_2" / "checkpoints" / "step_12")  # stopped mid-run: step_8 is its newest
    (set_dir / "layer_1" / "checkpoints" / "step_8").rename(set_dir / "layer_1" / "checkpoints" / ".tmp-x")
    shutil.rmtree(set_dir / "layer_0")  # never started
    assert main(set_args(tiny_dirs["gemma2"], tmp_path)) == 2  # no common step: refused, naming the steps
    assert "different steps" in capsys.readouterr().err
    shutil.rmtree(set_dir / "layer_1" / "checkpoints" / "step_12")
    (set_dir / "layer_1" / "checkpoints" / ".tmp-x").rename(set_dir / "layer_1" / "checkpoints" / "step_8")
    assert main(set_args(tiny_dirs["gemma2"], tmp_path)) == 0
    printed = capsys.readouterr()
    assert "resuming the interrupted pass first: layers 1,2" in printed.out
    assert "resumed from step 8" in printed.err
    assert_same_weights(weights(one_pass_set), weights(set_dir))
    assert main(set_args(tiny_dirs["gemma2"], tmp_path)) == 0
    assert "every layer is finished" in capsys.readouterr().out


@pytest.mark.parametrize("extra, named", [(("--layer", "1"), "--layer"), (("--source-hook", "blocks.0.hook_resid_pre"),
                                          "--source-hook"), (("--resume", "somewhere"), "--resume"),
                                          (("--layers", "0-7"), "out of range")])
def test_set_refuses_settings_it_cannot_honour(tiny_dirs, tmp_path, capsys, model_loads, extra, named):
    assert main(set_args(tiny_dirs["gemma2"], tmp_path, *extra)) == 2
    assert named in capsys.readouterr().err.splitlines()[-1]
    assert not model_loads


def test_set_refuses_other_layers_or_settings_in_its_folder(one_pass_set, tiny_dirs, tmp_path, capsys):
    shutil.copytree(one_pass_set, tmp_path / "s")
    assert main(set_args(tiny_dirs["gemma2"], tmp_path, "--layers", "0-1")) == 2
    assert "set of layers [0, 1, 2], not [0, 1]" in capsys.readouterr().err
    assert main(set_args(tiny_dirs["gemma2"], tmp_path, "--k", "5")) == 2
    assert "k: checkpoint has 4, now 5" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_loads_nothing(tiny_dirs, tmp_path, capsys, model_loads):
    assert main(set_args(tiny_dirs["gemma2"], tmp_path, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "memory plan on CPU RAM" in out and "layers by pass: 0-2" in out
    assert not model_loads and not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- exports of a set
def test_circuit_tracer_export_of_a_set_at_full_width_and_prefix_1(one_pass_set, tmp_path):
    models = load_set(one_pass_set)
    for prefix, width in ((None, 48), (1, 16)):
        folder = export("circuit-tracer", one_pass_set, tmp_path / f"ct{prefix}", prefix=prefix)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["model_kind"] == "transcoder_set"
        assert (config["feature_input_hook"], config["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
        assert config["transcoders"] == [f"layer_{layer}.safetensors" for layer in range(3)]
        for layer, model in models.items():
            tensors = load_file(folder / f"layer_{layer}.safetensors")
            assert tensors["W_enc"].shape == (width, 64)
            x = torch.randn(5, 64)
            read = load_export(folder, layer=layer)
            torch.testing.assert_close(read(x), model(x, prefix=prefix), rtol=1e-5, atol=1e-5)
    assert yaml.safe_load((tmp_path / "ct1" / "config.yaml").read_text())["scan"] == "mtc/s/prefix_1"


def test_gemma_scope_and_saelens_exports_of_a_set_at_a_prefix(one_pass_set, tmp_path):
    for fmt in ("gemma-scope", "saelens"):
        folder = export(fmt, one_pass_set, tmp_path / fmt, prefix=1)
        for layer in range(3):
            path = folder / f"layer_{layer}" / ("params.npz" if fmt == "gemma-scope" else "")
            read = load_export(path, layer=layer)
            assert read.cfg.d_sae == 16


def test_export_refuses_what_circuit_tracer_would_reject(one_pass_set, trained_run, tmp_path, capsys):
    assert main(["export", "circuit-tracer", "--run", str(trained_run), "--out", str(tmp_path / "x")]) == 2
    assert "every layer 0..2" in capsys.readouterr().err
    assert main(["export", "saelens", "--run", str(one_pass_set), "--prefix", "3", "--out", str(tmp_path / "y")]) == 2
    assert "--prefix 3" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("")
    assert main(["export", "saelens", "--run", str(one_pass_set), "--out", str(tmp_path / "notes")]) == 2
    assert (tmp_path / "notes" / "thesis.tex").is_file()


def test_export_replaces_an_earlier_export(one_pass_set, tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["export", "circuit-tracer", "--run", str(one_pass_set), "--out", str(out)]) == 0
    assert main(["export", "circuit-tracer", "--run", str(one_pass_set), "--prefix", "1", "--out", str(out)]) == 0
    assert load_file(out / "layer_0.safetensors")["W_dec"].shape == (16, 64)
    assert not list(tmp_path.glob(".tmp-*"))


def test_prefix_model_is_the_prefix_of_the_model():
    cfg = TranscoderConfig(d_in=8, d_out=6, d_sae=32, prefix_sizes=[4, 12, 32], k=6, skip_connection=True,
                           prefix_weights=[1.0, 2.0, 3.0])
    model = MatryoshkaTranscoder(cfg)
    with torch.no_grad():
        model.threshold.fill_(0.1)
        model.W_skip.normal_()
        model.b_dec.normal_()
    x = torch.randn(10, 8)
    for prefix in (1, 2, 3):
        cut = model.prefix_model(prefix)
        assert cut.cfg.d_sae == cfg.prefix_sizes[prefix - 1] and cut.cfg.prefix_sizes == cfg.prefix_sizes[:prefix]
        torch.testing.assert_close(cut(x), model(x, prefix=prefix))
    assert model.prefix_model(1).cfg.k == 4  # k cannot exceed the prefix's latents
    with pytest.raises(ValueError, match="prefix must be between 1 and 3"):
        model.prefix_model(4)


def test_eval_of_a_set_replaces_every_mlp_at_once(one_pass_set, capsys):
    assert main(["eval", "--run", str(one_pass_set), "--tokens", "256"]) == 0
    report = json.loads((one_pass_set / "replacement.json").read_text())
    assert report["kind"] == "transcoder_set" and report["layers"] == [0, 1, 2]
    assert [row["prefix"] for row in report["prefixes"]] == [1, 2] and len(report["full"]["fvu_per_layer"]) == 3
    assert report["ce_zero_ablation"] != report["ce_clean"]
    assert "every MLP zeroed" in capsys.readouterr().out
