"""Exports read back by independent numpy JumpReLUs that follow each format's own convention."""

import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

import mtc
from mtc import MatryoshkaTranscoder, TranscoderConfig
from mtc.gemma_scope import export_gemma_scope, load_gemma_scope
from mtc.interop import JumpReLUTranscoder, export_circuit_tracer, export_saelens, load_export, load_wandb_artifact
from mtc.language_model import default_hooks


def trained_model(d_in=16, d_out=12, skip=False, **changes):
    base = dict(d_in=d_in, d_out=d_out, d_sae=64, prefix_sizes=[8, 24, 64], k=4, batch_size=32,
                total_tokens=3200, warmup_steps=0, skip_connection=skip,
                source_hook="blocks.3.ln2.hook_normalized", target_hook="blocks.3.hook_mlp_out")
    base.update(changes)
    model = MatryoshkaTranscoder(TranscoderConfig(**base))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        out = model.training_forward(torch.randn(32, d_in), torch.randn(32, d_out))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        if skip:  # a dense, asymmetric skip matrix, so a wrong transpose cannot go unnoticed
            model.W_skip.normal_(0, 0.3)
        model.b_dec.normal_()
    assert float(model.threshold) > 0
    return model.eval()


def inputs(d_in, n=40):
    return np.random.default_rng(0).normal(size=(n, d_in)).astype(np.float32)


def ours(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def assert_same_outputs(a, b, x):
    np.testing.assert_allclose(ours(a, x), ours(b, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- SAELens
def saelens_reference(folder, x):
    """SAELens JumpReLU(Skip)Transcoder: relu(pre) masked by pre > threshold; W_skip is [d_out, d_in]."""
    w = load_file(str(folder / "sae_weights.safetensors"))
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = np.maximum(pre, 0) * (pre > w["threshold"])
    y = acts @ w["W_dec"] + w["b_dec"]
    return y + x @ w["W_skip"].T if "W_skip" in w else y


@pytest.mark.parametrize("skip", [False, True])
def test_saelens_export_reproduced_by_numpy(tmp_path, skip):
    model = trained_model(skip=skip)
    folder = export_saelens(model, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (16, 64, 12)
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.ln2.hook_normalized"
    assert meta["hook_name_out"] == "blocks.3.hook_mlp_out"
    assert meta["model_name"] == model.cfg.model_name and meta["prefix_sizes"] == [8, 24, 64]
    w = load_file(str(folder / "sae_weights.safetensors"))
    shapes = {k: v.shape for k, v in w.items()}
    expected = {"W_enc": (16, 64), "W_dec": (64, 12), "b_enc": (64,), "b_dec": (12,), "threshold": (64,)}
    assert shapes == ({**expected, "W_skip": (12, 16)} if skip else expected)

    x = inputs(16)
    np.testing.assert_allclose(saelens_reference(folder, x), ours(model, x), rtol=1e-5, atol=1e-5)
    loaded = load_export(folder)
    assert loaded.cfg == model.cfg
    assert_same_outputs(loaded, model, x)
    assert_same_outputs(loaded.eval(), model, x)


def test_saelens_export_records_the_matryoshka_training_as_saelens_does(tmp_path):
    """SAELens's metadata names the training architecture and its widths (`training_architecture`,
    `training_architecture_details.matryoshka_widths`), next to mtc's own `prefix_sizes`; a prefix export
    carries its own, shorter widths."""
    model = trained_model()
    meta = json.loads((export_saelens(model, tmp_path / "full") / "cfg.json").read_text())["metadata"]
    assert meta["training_architecture"] == "matryoshka_batchtopk"
    assert meta["training_architecture_details"] == {"k": 4, "aux_loss_coefficient": model.cfg.aux_coeff,
                                                     "matryoshka_widths": [8, 24, 64]}
    assert meta["prefix_sizes"] == [8, 24, 64]
    meta = json.loads((export_saelens(model.prefix_model(2), tmp_path / "p2") / "cfg.json").read_text())["metadata"]
    assert meta["training_architecture_details"]["matryoshka_widths"] == [8, 24]
    plain = trained_model(prefix_sizes=[64])
    meta = json.loads((export_saelens(plain, tmp_path / "plain") / "cfg.json").read_text())["metadata"]
    assert meta["training_architecture"] == "batchtopk" and "matryoshka_widths" not in meta["training_architecture_details"]
    assert load_export(tmp_path / "p2").cfg.prefix_sizes == [8, 24]


def test_saelens_config_without_our_metadata_still_loads(tmp_path):
    model = trained_model()
    folder = export_saelens(model, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["mtc_config"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_export(folder)
    assert loaded.cfg.prefix_sizes == [64] and loaded.cfg.source_hook == model.cfg.source_hook
    assert_same_outputs(loaded, model, inputs(16))


# ---------------------------------------------------------------------- circuit-tracer
def circuit_tracer_reference(path, x):
    """circuit-tracer SingleLayerTranscoder: F.linear(x, W_enc, b_enc) with W_enc [d_sae, d_model],
    JumpReLU x * (x > threshold), acts @ W_dec + b_dec, plus x @ W_skip.T."""
    w = load_file(str(path))
    pre = x @ w["W_enc"].T + w["b_enc"]
    acts = pre * (pre > w["activation_function.threshold"])
    y = acts @ w["W_dec"] + w["b_dec"]
    return y + x @ w["W_skip"].T if "W_skip" in w else y


@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_export_reproduced_by_numpy(tmp_path, skip):
    model = trained_model(d_in=12, d_out=12, skip=skip)
    folder = export_circuit_tracer(model, tmp_path / "ct", layer=3)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    assert config["feature_output_hook"] == "hook_mlp_out"
    assert config["model_name"] == model.cfg.model_name
    path = folder / "layer_3.safetensors"
    w = load_file(str(path))
    expected = {"W_enc": (64, 12), "W_dec": (64, 12), "b_enc": (64,), "b_dec": (12,),
                "activation_function.threshold": (64,)}
    assert {k: v.shape for k, v in w.items()} == ({**expected, "W_skip": (12, 12)} if skip else expected)

    x = inputs(12)
    np.testing.assert_allclose(circuit_tracer_reference(path, x), ours(model, x), rtol=1e-5, atol=1e-5)
    loaded = load_export(folder)
    assert loaded.cfg == model.cfg
    assert_same_outputs(loaded, model, x)


def test_circuit_tracer_layers_share_a_folder_and_hooks(tmp_path):
    first = trained_model(d_in=12, d_out=12, source_hook="blocks.0.ln2.hook_normalized",
                          target_hook="blocks.0.hook_mlp_out")
    second = trained_model(d_in=12, d_out=12, source_hook="blocks.1.ln2.hook_normalized",
                           target_hook="blocks.1.hook_mlp_out")
    export_circuit_tracer(first, tmp_path, layer=0)
    export_circuit_tracer(second, tmp_path, layer=1)
    with pytest.raises(ValueError, match=r"layers \[0, 1\]; pass layer="):
        load_export(tmp_path)
    assert_same_outputs(load_export(tmp_path, layer=1), second, inputs(12))
    other = trained_model(d_in=12, d_out=12, source_hook="blocks.2.mlp.hook_in",
                          target_hook="blocks.2.hook_mlp_out")
    with pytest.raises(ValueError, match="feature_input_hook: folder has 'ln2.hook_normalized'"):
        export_circuit_tracer(other, tmp_path, layer=2)


def test_circuit_tracer_export_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="d_in=16 to d_out=12"):
        export_circuit_tracer(trained_model(), tmp_path, layer=3)
    with pytest.raises(ValueError, match=r"'blocks.3.ln2.hook_normalized' is not under blocks.4."):
        export_circuit_tracer(trained_model(d_in=12), tmp_path, layer=4)


# ---------------------------------------------------------------------- Gemma Scope
def gemma_scope_reference(arrays, x):
    pre = x @ arrays["W_enc"] + arrays["b_enc"]
    return (pre * (pre > arrays["threshold"])) @ arrays["W_dec"] + arrays["b_dec"]


def test_gemma_scope_export_round_trip(tmp_path):
    model = trained_model()
    path = export_gemma_scope(model, tmp_path / "layer_3")
    x = inputs(16)
    with np.load(path) as npz:
        np.testing.assert_allclose(gemma_scope_reference(dict(npz), x), ours(model, x), rtol=1e-5, atol=1e-5)
    for loaded in (load_export(path), load_export(path.parent), load_gemma_scope(path)):
        assert isinstance(loaded, JumpReLUTranscoder)
        assert loaded.cfg.source_hook == "blocks.3.ln2.hook_normalized"  # as SAELens and circuit-tracer feed it
        assert_same_outputs(loaded, model, x)


def random_gemma_scope(d_in=10, d_sae=32, d_out=6, scalar_threshold=False):
    rng = np.random.default_rng(1)
    threshold = np.float32(0.3) if scalar_threshold else rng.uniform(0, 1, d_sae).astype(np.float32)
    return {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
            "W_dec": rng.normal(size=(d_sae, d_out)).astype(np.float32),
            "b_enc": rng.normal(size=d_sae).astype(np.float32),
            "b_dec": rng.normal(size=d_out).astype(np.float32), "threshold": threshold}


@pytest.mark.parametrize("scalar_threshold", [False, True])
def test_load_gemma_scope_matches_numpy(tmp_path, scalar_threshold):
    arrays = random_gemma_scope(scalar_threshold=scalar_threshold)
    path = tmp_path / "layer_17" / "width_16k" / "average_l0_9" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **arrays)
    model = load_gemma_scope(str(path))
    assert isinstance(model, JumpReLUTranscoder) and model.threshold.shape == (32,)
    cfg = model.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.d_out, cfg.prefix_sizes, cfg.k) == (10, 32, 6, [32], 9)
    assert (cfg.source_hook, cfg.target_hook) == default_hooks(17)  # ln2.hook_normalized, as SAELens and circuit-tracer
    assert cfg.model_name == "google/gemma-2-2b"
    x = inputs(10)
    np.testing.assert_allclose(ours(model, x), gemma_scope_reference(arrays, x), rtol=1e-5, atol=1e-5)

    # saved with mtc.save, the per-latent threshold comes back through load_export
    mtc.save(model, tmp_path / "saved")
    assert_same_outputs(load_export(tmp_path / "saved"), model, x)


def test_load_gemma_scope_needs_a_layer(tmp_path):
    np.savez(tmp_path / "params.npz", **random_gemma_scope())
    with pytest.raises(ValueError, match="pass layer="):
        load_gemma_scope(tmp_path / "params.npz")
    assert load_gemma_scope(tmp_path / "params.npz", layer=2).cfg.target_hook == "blocks.2.hook_mlp_out"


def write_gemma_scope_2(folder, arrays, skip=None, config=None):
    """A Gemma Scope 2 transcoder as Google publishes it: lower-case keys in params.safetensors, config.json beside."""
    from safetensors.numpy import save_file

    tensors = {"w_enc": arrays["W_enc"], "w_dec": arrays["W_dec"], "b_enc": arrays["b_enc"], "b_dec": arrays["b_dec"],
               "threshold": arrays["threshold"]}
    if skip is not None:
        tensors["affine_skip_connection"] = skip
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder / "params.safetensors"


def test_load_gemma_scope_2_with_its_affine_skip_and_config_hooks(tmp_path):
    arrays = random_gemma_scope(d_in=10, d_out=10)
    skip = np.random.default_rng(2).normal(size=(10, 10)).astype(np.float32)
    config = {"hf_hook_point_in": "model.layers.6.pre_feedforward_layernorm.output",
              "hf_hook_point_out": "model.layers.6.post_feedforward_layernorm.output", "width": 32,
              "model_name": "google/gemma-3-270m", "architecture": "jump_relu", "l0": 7, "affine_connection": True,
              "type": "transcoder"}
    path = write_gemma_scope_2(tmp_path / "transcoder_all" / "layer_6_width_16k_l0_small", arrays, skip, config)
    model = load_gemma_scope(path)
    cfg = model.cfg
    assert (cfg.source_hook, cfg.target_hook) == ("blocks.6.mlp.hook_in", "blocks.6.hook_mlp_out")
    assert (cfg.d_sae, cfg.k, cfg.model_name, cfg.skip_connection) == (32, 7, "google/gemma-3-270m", True)
    x = inputs(10)
    np.testing.assert_allclose(ours(model, x), gemma_scope_reference(arrays, x) + x @ skip, rtol=1e-5, atol=1e-4)
    assert_same_outputs(load_gemma_scope(str(path)), model, x)


def test_load_gemma_scope_2_without_config_takes_the_layer_from_the_path(tmp_path):
    arrays = random_gemma_scope()
    path = write_gemma_scope_2(tmp_path / "layer_11_width_16k_l0_big", arrays)
    model = load_gemma_scope(path)
    assert (model.cfg.source_hook, model.cfg.target_hook) == ("blocks.11.mlp.hook_in", "blocks.11.hook_mlp_out")
    assert model.W_skip is None
    np.testing.assert_allclose(ours(model, inputs(10)), gemma_scope_reference(arrays, inputs(10)), rtol=1e-5, atol=1e-5)
    named = write_gemma_scope_2(tmp_path / "gemma-scope-2-270m-pt" / "transcoder_all" / "layer_3_width_16k_l0_small", arrays)
    assert load_gemma_scope(named).cfg.model_name == "google/gemma-3-270m"  # from the repository's name


def test_load_gemma_scope_2_names_what_is_wrong(tmp_path):
    arrays = random_gemma_scope()
    bad_point = write_gemma_scope_2(tmp_path / "a" / "layer_1", arrays, config={
        "hf_hook_point_in": "model.layers.1.self_attn.o_proj.input", "hf_hook_point_out": "model.layers.1.output"})
    with pytest.raises(ValueError, match=r"self_attn.o_proj.input' has no mtc equivalent"):
        load_gemma_scope(bad_point)
    bad_skip = write_gemma_scope_2(tmp_path / "b" / "layer_1", arrays, skip=np.zeros((6, 10), np.float32))
    with pytest.raises(ValueError, match=r"affine_skip_connection has shape \[6, 10\], expected \[10, 6\]"):
        load_gemma_scope(bad_skip)
    from safetensors.numpy import save_file

    (tmp_path / "c" / "layer_1").mkdir(parents=True)
    save_file({"w_enc": arrays["W_enc"]}, str(tmp_path / "c" / "layer_1" / "params.safetensors"))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['w_dec', 'b_enc', 'b_dec', 'threshold'\]"):
        load_gemma_scope(tmp_path / "c" / "layer_1" / "params.safetensors")


@pytest.mark.parametrize("key, value, message", [
    ("W_enc", np.zeros((10, 32, 1)), r"W_enc has shape \[10, 32, 1\], expected 2-D \[d_in, d_sae\]"),
    ("W_dec", np.zeros((31, 6)), r"W_dec has shape \[31, 6\], expected \[d_sae, d_out\] = \[32, d_out\]"),
    ("b_enc", np.zeros(6), r"b_enc has shape \[6\], expected \[32\]"),
    ("b_dec", np.zeros(10), r"b_dec has shape \[10\], expected \[6\]"),
    ("threshold", np.zeros((32, 1)), r"threshold has shape \[32, 1\], expected \[32\] \(one per latent\)"),
])
def test_load_gemma_scope_rejects_wrong_shapes(tmp_path, key, value, message):
    arrays = {**random_gemma_scope(), key: value.astype(np.float32)}
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_gemma_scope(tmp_path / "params.npz", layer=0)


def test_load_gemma_scope_rejects_missing_keys(tmp_path):
    arrays = random_gemma_scope()
    del arrays["threshold"], arrays["b_dec"]
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['b_dec', 'threshold'\]"):
        load_gemma_scope(tmp_path / "params.npz", layer=0)


def test_load_gemma_scope_from_the_hub_fails_clearly_offline():
    with pytest.raises(RuntimeError, match="google/gemma-scope-2b-pt-transcoders.*HF_TOKEN"):
        load_gemma_scope("google/gemma-scope-2b-pt-transcoders/layer_17/width_16k/average_l0_9/params.npz")
    with pytest.raises(FileNotFoundError):
        load_gemma_scope("/no/such/params.npz")


# ---------------------------------------------------------------------- any export, W&B
def test_load_export_reads_mtc_folders_and_names_unknown_ones(tmp_path):
    model = trained_model(skip=True)
    mtc.save(model, tmp_path / "m")
    loaded = load_export(tmp_path / "m")
    assert type(loaded) is MatryoshkaTranscoder and loaded.cfg == model.cfg
    assert_same_outputs(loaded, model, inputs(16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no known export"):
        load_export(tmp_path / "empty")


def fake_wandb(monkeypatch, source=None, error=None):
    calls = []

    class Artifact:
        def download(self, root=None):
            if error:
                raise error
            shutil.copytree(source, root, dirs_exist_ok=True)
            return root

    class Api:
        def artifact(self, name):
            calls.append(name)
            return Artifact()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    return calls


def test_load_wandb_artifact_loads_the_downloaded_checkpoint(tmp_path, monkeypatch):
    model = trained_model(skip=True)
    mtc.save(model, tmp_path / "ckpt")
    calls = fake_wandb(monkeypatch, source=tmp_path / "ckpt")
    loaded = load_wandb_artifact("me/mtc/run-checkpoint:latest")
    assert calls == ["me/mtc/run-checkpoint:latest"]
    assert loaded.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert_same_outputs(loaded, model, inputs(16))
    load_wandb_artifact("me/mtc/run-checkpoint:latest", root=tmp_path / "kept")
    assert (tmp_path / "kept" / "model.safetensors").is_file()


def test_load_wandb_artifact_failure_gives_advice(monkeypatch):
    fake_wandb(monkeypatch, error=ConnectionError("no route to host"))
    with pytest.raises(RuntimeError, match="no route to host.*WANDB_API_KEY"):
        load_wandb_artifact("me/mtc/run-checkpoint:latest")


def test_imported_per_latent_thresholds_work_with_prefixes(tmp_path):
    from mtc.interop import export_saelens, load_export

    model = trained_model().eval()
    loaded = load_export(export_saelens(model, tmp_path / "sl"))
    x = torch.randn(5, 16)
    for g in (1, 2, 3):
        torch.testing.assert_close(loaded(x, prefix=g), model(x, prefix=g), rtol=1e-5, atol=1e-5)
