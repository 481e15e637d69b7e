import json

import pytest
import torch

from mtc import TranscoderConfig


def small(**changes):
    base = dict(d_in=16, d_out=12, d_sae=64, prefix_sizes=[8, 32, 64], k=4, batch_size=32,
                total_tokens=3200, warmup_steps=10)
    base.update(changes)
    return TranscoderConfig(**base)


def test_json_round_trip_is_lossless():
    cfg = small(dtype=torch.bfloat16, model_dtype="float16", prefix_weights=[1, 2, 3], adam_betas=[0.8, 0.95],
                skip_connection=True)
    assert cfg.dtype == "bfloat16"
    again = TranscoderConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_save_and_load_file(tmp_path):
    cfg = small(seed=7, run_name="layer-3")
    cfg.save(tmp_path / "config.json")
    assert TranscoderConfig.load(tmp_path / "config.json") == cfg


def test_default_prefix_sizes_is_plain_batchtopk():
    cfg = TranscoderConfig(d_sae=128, k=8, prefix_sizes=[])
    assert cfg.prefix_sizes == [128]
    assert cfg.group_sizes == [128]
    assert small().group_sizes == [8, 24, 32]


@pytest.mark.parametrize("changes, field", [
    (dict(prefix_sizes=[8, 8, 64]), "prefix_sizes"),          # not strictly increasing
    (dict(prefix_sizes=[32, 8, 64]), "prefix_sizes"),
    (dict(prefix_sizes=[8, 32]), "prefix_sizes"),             # does not end at d_sae
    (dict(prefix_sizes=[0, 64]), "prefix_sizes"),
    (dict(k=0), "k"),
    (dict(k=65), "k"),
    (dict(d_sae=0, prefix_sizes=[]), "d_sae"),
    (dict(d_in=-3), "d_in"),
    (dict(d_out=2.5), "d_out"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(min_lr=1.0), "min_lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(total_tokens=16), "total_tokens"),                 # fewer tokens than one batch
    (dict(warmup_steps=101), "warmup_steps"),                # run has 100 steps
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(dtype="float8"), "dtype"),
    (dict(model_dtype="half-ish"), "model_dtype"),
    (dict(activation_dtype="int8"), "activation_dtype"),
    (dict(aux_coeff=-0.1), "aux_coeff"),
    (dict(threshold_momentum=1.0), "threshold_momentum"),
    (dict(prefix_weights=[1.0, 1.0]), "prefix_weights"),
    (dict(prefix_weights=[1.0, -1.0, 1.0]), "prefix_weights"),
    (dict(adam_betas=(0.9, 1.5)), "adam_betas"),
    (dict(grad_clip=0), "grad_clip"),
    (dict(k_aux=0), "k_aux"),
    (dict(run_name="a/b"), "run_name"),
])
def test_invalid_settings_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"TranscoderConfig\.{field}:"):
        small(**changes)


def test_unknown_json_field_is_named():
    data = small().to_dict()
    data["d_hidden"] = 3
    with pytest.raises(ValueError, match="d_hidden"):
        TranscoderConfig.from_dict(data)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TranscoderConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TranscoderConfig.load(tmp_path / "config.json")


def test_offline_corpus_budget_is_checked_up_front():
    with pytest.raises(ValueError, match=r"TranscoderConfig\.total_tokens: .*offline 'pydoc' corpus"):
        TranscoderConfig(dataset="pydoc", total_tokens=16_000_000)
    TranscoderConfig(dataset="HuggingFaceFW/fineweb-edu", total_tokens=16_000_000)


def test_configs_written_with_the_old_decoder_field_still_load():
    data = TranscoderConfig(d_sae=64, prefix_sizes=[64], k=4, batch_size=32, total_tokens=320,
                            warmup_steps=0).to_dict()
    del data["kernels"]
    data["decoder"] = "dense"
    assert TranscoderConfig.from_dict(data).kernels == "dense"


# ---------------------------------------------------------------------- field groups and --help
RESUMABLE = {"total_tokens", "output_dir", "drive_dir", "log_every", "checkpoint_every", "keep_checkpoints",
             "wandb_mode", "wandb_project", "wandb_entity", "wandb_log_checkpoints", "device", "run_name",
             "samples_every", "samples_top_n", "model_dtype", "activation_dtype", "compute_dtype", "kernels",
             "prefetch", "calibration_tokens"}
STORE = {"model_name", "dataset", "dataset_split", "text_column", "seq_len", "batch_size", "model_batch_size",
         "buffer_tokens", "activation_dtype", "seed", "total_tokens", "prefetch"}


def test_every_field_has_a_group_and_a_one_sentence_description():
    from dataclasses import fields

    from mtc.config import GROUPS

    names = {g.name for g in GROUPS}
    for f in fields(TranscoderConfig):
        assert f.metadata.get("group") in names, f.name
        text = f.metadata.get("help", "")
        assert text.strip() and text.endswith(".") and "\n" not in text, f.name
        assert not any(text[i + 2].isupper() for i in range(len(text) - 2) if text[i:i + 2] == ". "), f.name
    grouped = [name for g in GROUPS for name in TranscoderConfig.fields_in(g)]
    assert sorted(grouped) == sorted(f.name for f in fields(TranscoderConfig))
    assert all(TranscoderConfig.fields_in(g) for g in GROUPS)


def test_train_help_shows_every_description_by_group():
    import argparse
    import re
    from dataclasses import fields

    from mtc.cli import build_parser
    from mtc.config import GROUPS

    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = " ".join(train.format_help().split())  # undo argparse's line wrapping
    for f in fields(TranscoderConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert " ".join(f.metadata["help"].split()) + " (default: " in text, f.name
    for g in GROUPS:
        assert f"settings: {g.title}:" in text
    order = [text.index(f"settings: {g.title}:") for g in GROUPS]
    assert order == sorted(order)
    for g, start, end in zip(GROUPS, order, [*order[1:], len(text)]):
        flags = set(re.findall(r"--([a-z0-9-]+)", text[start:end]))
        assert {name.replace("_", "-") for name in TranscoderConfig.fields_in(g)} <= flags


def test_flags_keep_their_names_and_types():
    from mtc.cli import build_parser

    args = build_parser().parse_args(["train", "--d-sae", "64", "--no-skip-connection", "--prefix-sizes", "1", "2",
                                      "3", "--adam-betas", "0.8", "0.95", "--prefix-weights", "1", "2", "--prefetch",
                                      "--aux-coeff", "0.5"])
    assert (args.d_sae, args.skip_connection, args.prefix_sizes, args.adam_betas) == (64, False, [1, 2, 3], [0.8, 0.95])
    assert (args.prefix_weights, args.prefetch, args.aux_coeff) == ([1.0, 2.0], True, 0.5)
    assert not hasattr(args, "k") and not hasattr(args, "compute_dtype")
    bench = build_parser().parse_args(["bench", "--lr", "2e-3"])
    assert bench.lr == 2e-3 and bench.device == "auto"  # bench's own --device, not the config's


def test_hand_kept_lists_are_derived_from_the_groups():
    from mtc.checkpoint import RESUMABLE_CHANGES

    assert set(TranscoderConfig.resumable_fields()) == RESUMABLE
    assert set(RESUMABLE_CHANGES) == RESUMABLE
    assert set(TranscoderConfig.store_fields()) == STORE
    assert set(TranscoderConfig.fields_in("data")) <= STORE
    with pytest.raises(ValueError, match="unknown settings group"):
        TranscoderConfig.fields_in("logging")
    assert TranscoderConfig.description("d_sae") == "Number of latents."
