"""Cross-layer transcoders: the maths against a plain reference, unit folding, `train --clt` with exact resume,
the memory plan, and circuit-tracer's CLT files."""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtc.cli import main
from mtc.clt import CrossLayerTranscoder, build_model
from mtc.clt_interop import load_circuit_tracer_clt
from mtc.clt_train import LayerStack, clt_memory_plan, clt_parameters, load_clt
from mtc.config import TranscoderConfig
from mtc.memory import GiB, model_shape
from mtc.scaling import LayerScales
from mtc.transcoder import MatryoshkaTranscoder, batch_topk, straight_through_relu

TEMPLATES = dict(source_hook="blocks.{layer}.ln2.hook_normalized", target_hook="blocks.{layer}.hook_mlp_out")


def small_config(**changes) -> TranscoderConfig:
    settings = dict(d_in=16, d_out=16, d_sae=32, prefix_sizes=[8, 32], k=4, k_aux=8, clt_layers=[0, 1, 2],
                    samples_every=0, batch_size=64, total_tokens=640, warmup_steps=0, **TEMPLATES)
    return TranscoderConfig(**{**settings, **changes})


def reference_loss(model: CrossLayerTranscoder, x, y) -> torch.Tensor:
    """The module docstring's maths with dense tensors and loops: BatchTopK per layer, every prefix of every
    target, AuxK over each layer's dead latents."""
    cfg, n = model.cfg, model.n_layers
    dead = model.tokens_since_fired >= cfg.dead_after_tokens
    linear = [x[:, layer] @ model.W_enc[layer] + model.b_enc[layer] for layer in range(n)]
    z = [batch_topk(torch.relu(a), cfg.k)[0] for a in linear]
    y_hats = []
    for m in cfg.prefix_sizes:
        y_hat = model.b_dec.expand(len(x), -1, -1).clone()
        for layer in range(n):
            for target in range(layer, n):
                y_hat[:, target] = y_hat[:, target] + z[layer][:, :m] @ model.W_dec[layer][:m, target - layer]
        y_hats.append(y_hat)
    variance = torch.stack([(y[:, t] - y[:, t].mean(0)).pow(2).sum() for t in range(n)])
    fvu = torch.stack([torch.stack([(y[:, t] - y_hat[:, t]).pow(2).sum() / variance[t] for t in range(n)])
                       for y_hat in y_hats])
    main_loss = (fvu.mean(1) * model.prefix_weights).sum()
    aux_hat = torch.zeros_like(y)
    for layer in range(n):
        if dead[layer].any():
            values, latents = torch.where(dead[layer], linear[layer], -torch.inf).topk(
                min(cfg.k_aux, int(dead[layer].sum())), dim=-1)
            codes = torch.zeros(len(x), cfg.d_sae).scatter(1, latents, straight_through_relu(values))
            for target in range(layer, n):
                aux_hat[:, target] = aux_hat[:, target] + codes @ model.W_dec[layer][:, target - layer]
    residual = (y - y_hats[-1]).detach()
    aux = torch.stack([(residual[:, t] - aux_hat[:, t]).pow(2).sum() / variance[t] for t in range(n)]).mean() \
        if dead.any() else 0.0
    return main_loss + cfg.aux_coeff * aux


@pytest.mark.parametrize("dead", [False, True])
def test_training_loss_and_gradients_equal_the_reference(dead):
    torch.manual_seed(0)
    model = CrossLayerTranscoder(small_config(dead_after_tokens=1))
    x, y = torch.randn(64, 3, 16), torch.randn(64, 3, 16)
    model.init_from_batch(x, y)
    with torch.no_grad():  # decoders to later layers in use, as after some training
        for W in model.W_dec:
            W.add_(0.3 * torch.randn_like(W))
    if dead:
        model.tokens_since_fired[1, :5] = 100
        model.tokens_since_fired[2, 7] = 100
    out = model.training_forward(x, y, update_stats=False)
    out.loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = reference_loss(model, x, y)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    assert (float(out.aux_loss) > 0) == dead
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)


def trained_looking(seed: int, threshold: float) -> CrossLayerTranscoder:
    """A small CLT with random decoders to every later layer and a JumpReLU threshold."""
    torch.manual_seed(seed)
    model = CrossLayerTranscoder(small_config())
    with torch.no_grad():
        for W in model.W_dec:
            W.normal_()
        model.threshold.fill_(threshold)
    return model


def test_inference_is_jumprelu_per_layer_and_prefixes_nest():
    model = trained_looking(1, 0.5)
    x = torch.randn(10, 3, 16)
    z = model.encode(x)
    for layer in range(3):
        pre = torch.relu(x[:, layer] @ model.W_enc[layer] + model.b_enc[layer])
        torch.testing.assert_close(z[:, layer], pre * (pre > 0.5))
    second = z[:, 0] @ model.W_dec[0][:, 1] + z[:, 1] @ model.W_dec[1][:, 0] + model.b_dec[1]
    torch.testing.assert_close(model(x)[:, 1], second)
    first = model.prefix_model(1)
    assert first.cfg.d_sae == 8 and first.cfg.prefix_sizes == [8]
    torch.testing.assert_close(first(x), model(x, prefix=1))
    torch.testing.assert_close(first.encode(x), z[..., :8])


def test_folded_scales_map_raw_activations_as_training_units_did():
    model = trained_looking(2, 0.2)
    scales = LayerScales(source=(2.0, 0.5, 3.0), target=(10.0, 100.0, 0.1))
    x = torch.randn(10, 3, 16)
    raw = build_model(model.cfg)
    raw.load_state_dict(scales.fold(model.state_dict()))
    x_raw = x * torch.tensor(scales.source)[:, None]
    expected = model(x) * torch.tensor(scales.target)[:, None]
    torch.testing.assert_close(raw(x_raw), expected, rtol=1e-5, atol=1e-4)
    assert LayerScales.from_dict(scales.to_dict()) == scales
    assert torch.equal(scales.training_units(x_raw, expected)[0], x_raw / torch.tensor(scales.source)[:, None])


@pytest.mark.parametrize("field, value", [("skip_connection", True), ("decoder_init", "batch"), ("samples_every", 5),
                                          ("clt_layers", [2, 1]), ("source_hook", "blocks.0.ln2.hook_normalized")])
def test_config_refuses_what_a_clt_cannot_train(field, value):
    with pytest.raises(ValueError, match=f"TranscoderConfig.{field}"):
        small_config(**{field: value})


def test_memory_plan_counts_every_pair_of_layers_and_names_the_fix():
    shape = model_shape("google/gemma-2-2b")
    cfg = TranscoderConfig(d_in=2304, d_out=2304, d_sae=2048, k=64, clt_layers=list(range(26)), samples_every=0,
                           buffer_tokens=8_192, batch_size=1024, activation_dtype="bfloat16", model_dtype="bfloat16",
                           **TEMPLATES)
    assert clt_parameters(cfg) == 26 * (2304 * 2048 + 2048 + 2304) + 2048 * 2304 * 351
    plan = clt_memory_plan(cfg, shape, "a100-80gb", 80 * GiB)
    assert plan.passes == [list(range(26))]
    with pytest.raises(ValueError, match="Lower d_sae .*batch_size"):
        clt_memory_plan(cfg, shape, "t4", 15 * GiB)
    with pytest.raises(ValueError, match="batch_size"):  # the step holds every pair of layers' reconstructions
        clt_memory_plan(cfg.replace(batch_size=4096), shape, "a100-80gb", 80 * GiB)


def clt_args(model_dir, out, *extra, steps=12):
    return ["train", "--clt", "--layers", "all", "--model-name", str(model_dir), "--d-sae", "48", "--prefix-sizes",
            "16", "48", "--k", "4", "--k-aux", "16", "--batch-size", "32", "--total-tokens", str(32 * steps),
            "--warmup-steps", "2", "--dead-after-tokens", "64", "--optimizer", "signsgd", "--lr", "1e-2", "--seq-len", "16", "--buffer-tokens", "256", "--model-batch-size",
            "8", "--checkpoint-every", "4", "--log-every", "4", "--drive-dir", "none", "--output-dir", str(out),
            "--run-name", "c-clt", "--dataset", "pydoc", "--no-progress", "--wandb-mode", "disabled", *extra]


@pytest.fixture(scope="module")
def trained_clt(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clt")
    assert main(clt_args(tiny_dirs["gemma2"], out)) == 0
    return out / "c-clt"


def test_train_clt_writes_one_run_that_learns(trained_clt):
    model = load_clt(trained_clt)
    assert model.cfg.clt_layers == [0, 1, 2] and model.cfg.source_hook == TEMPLATES["source_hook"]
    assert sorted(p.name for p in (trained_clt / "checkpoints").iterdir()) == ["step_12", "step_8"]
    assert (model.threshold > 0).all()
    assert any(W[:, 1:].abs().sum() > 0 for W in model.W_dec[:-1])  # the cross-layer decoders were trained


def test_train_clt_resumes_exactly(trained_clt, tiny_dirs, tmp_path, capsys):
    run_dir = tmp_path / "c-clt"
    shutil.copytree(trained_clt, run_dir)
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step_12")  # killed after step 8's checkpoint
    assert main(clt_args(tiny_dirs["gemma2"], tmp_path)) == 0
    assert "resumed from step 8" in capsys.readouterr().err
    expected, resumed = load_clt(trained_clt).state_dict(), load_clt(run_dir).state_dict()
    assert sorted(expected) == sorted(resumed)
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


@pytest.mark.slow
def test_train_clt_killed_with_sigkill_resumes_to_the_same_weights(tiny_dirs, tmp_path):
    """A CLT run killed (SIGKILL) after a checkpoint, then started again, ends with the weights of a run never
    stopped."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import killed_once_written

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")} | {"HF_HUB_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[1]

    def command(out):
        return [sys.executable, "-m", "mtc", *clt_args(tiny_dirs["gemma2"], out, steps=200)]

    reference = subprocess.run(command(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300,
                               cwd=repo)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    killed_once_written(command(out), out / "c-clt" / "checkpoints" / "step_40", env, repo)
    assert not (out / "c-clt" / "final").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300, cwd=repo)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stderr
    a = load_file(tmp_path / "ref" / "c-clt" / "final" / "model.safetensors")
    b = load_file(out / "c-clt" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_prints_the_plan_and_loads_nothing(tiny_dirs, tmp_path, capsys, model_loads):
    assert main(clt_args(tiny_dirs["gemma2"], tmp_path, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "CLT parameters (6 decoder pairs)" in printed and "1 pass of 3 layers" in printed
    assert model_loads == [] and not (tmp_path / "c-clt").exists()


def test_clt_needs_layers_and_one_process(tiny_dirs, tmp_path, capsys):
    args = clt_args(tiny_dirs["gemma2"], tmp_path)
    assert main([a for a in args if a not in ("--layers", "all")]) == 2
    assert "--clt needs --layers" in capsys.readouterr().err
    assert main([*args, "--clt-layers", "0", "1"]) == 2
    assert "not --clt-layers" in capsys.readouterr().err


def test_circuit_tracer_files_hold_the_clt_whole_and_at_a_prefix(trained_clt, tmp_path):
    model = load_clt(trained_clt)
    x = 3 * torch.randn(6, 3, 64)
    for prefix, width in ((None, 48), (1, 16)):
        out = tmp_path / f"ct-{prefix}"
        assert main(["export", "circuit-tracer", "--run", str(trained_clt), "--out", str(out),
                     *(["--prefix", str(prefix)] if prefix else [])]) == 0
        config = yaml.safe_load((out / "config.yaml").read_text())
        assert config["model_kind"] == "cross_layer_transcoder"
        assert (config["feature_input_hook"], config["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
        for i in range(3):
            encoder, decoder = load_file(out / f"W_enc_{i}.safetensors"), load_file(out / f"W_dec_{i}.safetensors")
            assert encoder[f"W_enc_{i}"].shape == (width, 64) and encoder[f"threshold_{i}"].shape == (width,)
            assert encoder[f"b_dec_{i}"].shape == (64,) and decoder[f"W_dec_{i}"].shape == (width, 3 - i, 64)
        back = load_circuit_tracer_clt(out)
        torch.testing.assert_close(back(x), model(x, prefix=prefix))


def test_clt_exports_only_to_circuit_tracer(trained_clt, tmp_path, capsys):
    assert main(["export", "saelens", "--run", str(trained_clt), "--out", str(tmp_path / "s")]) != 0
    assert "exports to circuit-tracer only" in capsys.readouterr().err


def test_layer_stack_serves_layers_stacked_and_shares_the_store_state():
    class Store:
        total_batches = None

        def next_batch(self):
            from mtc.activations import ActivationBatch
            return ActivationBatch([torch.zeros(4, 2), torch.ones(4, 2)], [torch.ones(4, 3), torch.zeros(4, 3)],
                                   torch.arange(4), torch.arange(4))

    store = Store()
    stacked = LayerStack(store)
    batch = stacked.next_batch()
    assert batch.sources[0].shape == (4, 2, 2) and batch.targets[0].shape == (4, 2, 3)
    assert torch.equal(batch.sources[0][:, 1], torch.ones(4, 2))
    stacked.total_batches = 7
    assert store.total_batches == 7


def test_build_model_picks_the_kind_from_the_config():
    assert isinstance(build_model(small_config()), CrossLayerTranscoder)
    plain = small_config(clt_layers=[], source_hook="blocks.0.ln2.hook_normalized", target_hook="blocks.0.hook_mlp_out")
    assert isinstance(build_model(plain), MatryoshkaTranscoder)


def test_replacement_of_a_clt_without_cross_layer_decoders_is_its_set(gemma2_bridge):
    """Every MLP replaced at once: a CLT whose decoders write only to their own layer is a set of transcoders, and
    both replacements give the same report; a CLT with cross-layer decoders gives another."""
    from mtc.data import special_token_ids
    from mtc.replacement import evaluate_replacement, replacement_for

    torch.manual_seed(3)
    cfg = small_config(d_in=64, d_out=64, d_sae=24, prefix_sizes=[8, 24])
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for W in clt.W_enc:
            W.mul_(4)
        clt.threshold.fill_(0.1)
        clt.b_dec.normal_()
    transcoders = {}
    for layer in range(3):
        layer_cfg = cfg.replace(clt_layers=[], source_hook=cfg.source_hook.format(layer=layer),
                                target_hook=cfg.target_hook.format(layer=layer))
        transcoders[layer] = MatryoshkaTranscoder(layer_cfg)
        transcoders[layer].load_state_dict({"W_enc": clt.W_enc[layer], "b_enc": clt.b_enc[layer],
                                            "W_dec": clt.W_dec[layer][:, 0], "b_dec": clt.b_dec[layer],
                                            "threshold": torch.tensor(0.1)})
    bos, _ = special_token_ids(gemma2_bridge.tokenizer)
    contexts = torch.randint(10, 200, (4, 12))
    contexts[:, 0] = bos
    as_clt = evaluate_replacement(replacement_for(clt), gemma2_bridge, contexts, batch_size=2)
    as_set = evaluate_replacement(replacement_for(transcoders), gemma2_bridge, contexts, batch_size=2)
    assert (as_clt["kind"], as_set["kind"]) == ("cross_layer_transcoder", "transcoder_set")
    assert as_clt["predicted_tokens"] == 4 * 11
    for ours, theirs in zip(as_clt["prefixes"], as_set["prefixes"]):
        for name in ("fvu", "ce_replaced", "ce_loss_score", "kl_div"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4), name
    assert as_clt["full"]["kl_div"] > 0
    with torch.no_grad():
        clt.W_dec[0][:, 1:].normal_()
    crossed = evaluate_replacement(replacement_for(clt), gemma2_bridge, contexts, batch_size=2)
    assert crossed["full"]["fvu_per_layer"][0] == pytest.approx(as_set["full"]["fvu_per_layer"][0], rel=1e-4)
    assert crossed["full"]["fvu_per_layer"][2] != pytest.approx(as_set["full"]["fvu_per_layer"][2], rel=1e-2)


def test_eval_of_a_clt_writes_the_replacement_report(trained_clt, capsys):
    assert main(["eval", "--run", str(trained_clt), "--tokens", "256"]) == 0
    assert "ce_loss_score" in capsys.readouterr().out
    assert (trained_clt / "replacement.json").is_file()


def test_dead_share_counts_the_latents_of_every_layer(trained_clt):
    import json

    lines = [json.loads(line) for line in (trained_clt / "metrics.jsonl").read_text().splitlines()]
    assert any(line["dead"] > 0 for line in lines)
    assert all(line["dead_pct"] == pytest.approx(100 * line["dead"] / (3 * 48)) for line in lines)


@pytest.mark.parametrize("optimizer", ["adam", "signsgd"])
def test_decoders_learn_at_the_rate_divided_by_the_root_of_their_targets(optimizer):
    from mtc.optim import make_optimizer, train_step

    model = CrossLayerTranscoder(small_config(optimizer=optimizer))
    opt = make_optimizer(model, model.cfg)
    x, y = torch.randn(64, 3, 16), torch.randn(64, 3, 16)
    model.init_from_batch(x, y)
    train_step(model, opt, x, y, lr=0.01)
    rates = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    assert sorted(rates.values()) == pytest.approx(sorted([0.01 / 3**0.5, 0.01 / 2**0.5] + [0.01] * 8))
    assert rates[id(model.W_dec[0])] == pytest.approx(0.01 / 3**0.5) and rates[id(model.W_enc[0])] == 0.01
    assert len(rates) == len(list(model.parameters()))
