import pytest
import torch

from mtc import TranscoderConfig
from mtc import language_model
from mtc.language_model import (OFFLINE_MODEL, default_hooks, explain_load_error, fit_config_to_model, hook_name,
                                hook_widths, load_language_model, native_bfloat16, resolve_model_dtype,
                                resolve_model_path, stop_layer, validate_hooks)


def test_site_names_and_default_pair():
    assert default_hooks(17) == ("blocks.17.ln2.hook_normalized", "blocks.17.hook_mlp_out")
    assert hook_name("mlp_in_normalized", 3) == hook_name("ln2_normalized", 3) == "blocks.3.ln2.hook_normalized"
    assert hook_name("resid_post", 8) == "blocks.8.hook_resid_post"
    assert hook_name("blocks.2.hook_attn_out") == "blocks.2.hook_attn_out"
    with pytest.raises(ValueError, match="needs a layer"):
        hook_name("mlp_out")
    assert stop_layer(["blocks.8.hook_resid_post", "blocks.9.hook_mlp_out"]) == 10


def test_widths_come_from_the_model(gemma2_bridge):
    widths = hook_widths(gemma2_bridge, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"])
    assert widths == {"blocks.1.ln2.hook_normalized": 64, "blocks.1.hook_mlp_out": 64}
    cfg = TranscoderConfig(source_hook="blocks.1.ln2.hook_normalized", target_hook="blocks.2.hook_mlp_out",
                           d_in=2304, d_out=2304, d_sae=128, k=4)
    fitted = fit_config_to_model(cfg, gemma2_bridge)
    assert (fitted.d_in, fitted.d_out) == (64, 64)


def test_default_hooks_hold_the_mlp_input_and_output(gemma2_bridge):
    """ln2.hook_normalized is the RMS-normalised MLP input before Gemma's (1 + w) weight; hook_mlp_out is
    what the MLP branch adds to the residual stream."""
    tokens = torch.tensor([[2, 10, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        _, cache = gemma2_bridge.run_with_cache(tokens)
    block = gemma2_bridge.original_model.model.layers[1]
    resid_mid = cache["blocks.1.hook_resid_mid"]
    normed = resid_mid / resid_mid.pow(2).mean(-1, keepdim=True).add(block.pre_feedforward_layernorm.eps).sqrt()
    torch.testing.assert_close(cache["blocks.1.ln2.hook_normalized"], normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"],
                               cache["blocks.1.hook_resid_post"])


@pytest.mark.parametrize("hook, match", [
    ("blocks.1.hook_mlp_outt", "does not exist on this model.*mlp_out"),
    ("blocks.7.hook_mlp_out", r"layer 7 is out of range; this model has layers 0\.\.2"),
])
def test_bad_hooks_fail_before_running(gemma2_bridge, hook, match):
    with pytest.raises(ValueError, match=match):
        validate_hooks(gemma2_bridge, [hook])


def test_gpt2_architecture_loads_with_the_same_hooks(tiny_dirs):
    bridge = load_language_model(str(tiny_dirs["gpt2"]))
    assert hook_widths(bridge, list(default_hooks(0))) == {"blocks.0.ln2.hook_normalized": 64,
                                                             "blocks.0.hook_mlp_out": 64}


def test_native_bfloat16_reads_the_cpu_flags():
    assert native_bfloat16("cpu", "flags : fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni")
    assert native_bfloat16("cpu", "flags : fpu sse2 amx_tile amx_bf16")
    assert not native_bfloat16("cpu", "flags : fpu sse2 avx2 avx512f avx512bw")  # AVX-512 alone emulates bfloat16
    assert not native_bfloat16("meta")


def test_auto_model_dtype_is_bfloat16_only_where_native(monkeypatch, tiny_dirs):
    assert resolve_model_dtype("float16", "cpu") == "float16"  # explicit dtypes pass through
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(language_model, "native_bfloat16", lambda device, flags=None, native=native: native)
        assert resolve_model_dtype("auto", "cpu") == str(expected).removeprefix("torch.")
        bridge = load_language_model(str(tiny_dirs["gpt2"]), dtype="auto")
        assert next(bridge.parameters()).dtype == expected
    assert TranscoderConfig(model_dtype="auto").model_dtype == "auto"
    with pytest.raises(ValueError, match="activation_dtype"):
        TranscoderConfig(activation_dtype="auto")


def test_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("google/gemma-2-2b") == "google/gemma-2-2b"


def test_hub_model_without_network_says_what_to_do():
    with pytest.raises(RuntimeError, match=f"no network|not a known.*{OFFLINE_MODEL}"):
        load_language_model("google/gemma-2-2b")


@pytest.mark.parametrize("error, advice", [
    (OSError("You are trying to access a gated repo. 401 Client Error"), "HF_TOKEN"),
    (OSError("404 Client Error: Repository Not Found"), "not a known Hugging Face model id"),
    (OSError("We couldn't connect to 'https://huggingface.co'"), "no network"),
])
def test_load_errors_are_explained(error, advice):
    assert advice in explain_load_error("google/gemma-2-2b", error)


def test_hook_widths_known_from_the_config_alone():
    from mtc.language_model import hook_width

    assert hook_width("blocks.3.ln2.hook_normalized", 64, 256) == 64
    assert hook_width("blocks.12.hook_mlp_out", 64, 256) == 64
    assert hook_width("blocks.0.mlp.hook_in", 64, 256) == 64
    assert hook_width("blocks.1.mlp.hook_post", 64, 256) == 256
    assert hook_width("blocks.2.attn.hook_z", 64, 256) is None  # measured on the loaded model instead
    assert hook_width("hook_embed", 64, 256) is None
