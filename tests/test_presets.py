import pytest

from mtc import TranscoderConfig
from mtc.presets import PRESETS, aux_window, defaults_for_layer, matryoshka_prefixes, sign_descent_lr


def test_learning_rate_falls_with_the_square_root_of_the_width_down_to_the_measured_floor():
    assert sign_descent_lr(2560) == pytest.approx(1.2649e-2)  # the demo's rate, sparsify's rule
    assert sign_descent_lr(640) == pytest.approx(2 * sign_descent_lr(2560), rel=1e-4)
    assert sign_descent_lr(8192) == sign_descent_lr(16_384) == sign_descent_lr(36_864) == pytest.approx(1.06e-2)
    assert PRESETS["gemma2-2b-l17"]["lr"] == PRESETS["gemma2-2b-l12"]["lr"] == pytest.approx(1.06e-2)


def test_aux_window_holds_sixteen_firings_of_an_average_latent():
    assert aux_window(2560, 32) == 1280
    assert aux_window(18_432, 96) == 3072
    assert aux_window(2 * 2560, 32) == 2 * aux_window(2560, 32)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_with_the_recipe_at_its_width(name):
    preset = PRESETS[name]
    assert preset["optimizer"] == "signsgd"
    assert preset["lr"] == sign_descent_lr(preset["d_sae"])
    assert preset["dead_after_tokens"] == aux_window(preset["d_sae"], preset["k"])
    assert preset["prefix_sizes"] == matryoshka_prefixes(preset["d_sae"])
    TranscoderConfig.from_dict({**preset, "d_in": 64, "d_out": 64})  # validates


def test_defaults_for_any_layer_follow_the_recipe():
    settings = defaults_for_layer(4, d_model=640, model_name="some/model")
    assert settings["d_sae"] == 5120 and settings["lr"] == sign_descent_lr(5120)
    assert settings["dead_after_tokens"] == aux_window(5120, settings["k"])
