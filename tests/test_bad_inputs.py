"""A battery of bad inputs to `python -m mtc train`, run in-process on a tiny model: sizes, prefixes,
dtypes, hooks, layers, datasets, config files, resume paths, damaged checkpoints, output dirs. Every one
must exit non-zero with an `error:` line naming the field or file, print no traceback, and, unless it
needs the model to be found out (hook names, layers, widths), fail before the language model loads."""

import shutil
from pathlib import Path

import pytest
from conftest import train_args

from mtc.cli import main

BEFORE, AFTER = "before the model loads", "after the model loads"


def damaged(ws, name, spoil):
    """A copy of the trained run's step_30 with one file spoilt."""
    step = ws / "damaged" / name / "step_30"
    shutil.copytree(ws / "trained" / "checkpoints" / "step_30", step)
    spoil(step)
    return step


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def ws(trained_run, tmp_path_factory):
    """Files and folders the bad inputs point at."""
    ws = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(trained_run, ws / "trained")
    (ws / "no_text.jsonl").write_text('{"content": "text under another column"}\n')
    (ws / "text.jsonl").write_text('{"text": "some text"}\n')
    (ws / "broken.jsonl").write_text('{"text": "unterminated\n')
    (ws / "blank_text.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (ws / "empty.jsonl").write_text("")
    (ws / "table.csv").write_text("text\nhello\n")
    (ws / "no_data").mkdir()
    (ws / "a_file").write_text("a file, not a folder")
    (ws / "empty_model").mkdir()
    (ws / "list.json").write_text('[{"d_sae": 64}]')
    (ws / "malformed.json").write_text('{"d_sae": 64,\n "k": }')
    (ws / "unknown.json").write_text('{"d_sea": 64}')
    (ws / "bad_lr.json").write_text('{"lr": -1}')
    (ws / "bad_prefixes.json").write_text('{"prefix_sizes": "abc"}')
    (ws / "bad_betas.json").write_text('{"adam_betas": 5}')
    (ws / "a_folder.json").mkdir()
    (ws / "text_cfg.json").write_text('{"dataset_split": "train"}')
    (ws / "blocked").mkdir()
    (ws / "blocked" / "r").write_text("a file where the run dir should be")
    damaged(ws, "no_meta", lambda s: (s / "meta.json").unlink())
    damaged(ws, "trunc_weights", lambda s: truncate(s / "model.safetensors"))
    damaged(ws, "zero_state", lambda s: (s / "trainer_state.pt").write_bytes(bytes(1000)))
    damaged(ws, "trunc_state", lambda s: truncate(s / "trainer_state.pt"))
    shutil.copytree(ws / "trained", ws / "all_damaged" / "r")
    for step in ("step_20", "step_30"):
        truncate(ws / "all_damaged" / "r" / "checkpoints" / step / "model.safetensors")
    return ws


# (id, extra flags given the workspace, text the error line must hold: the field or file, when it fails)
BATTERY = [
    # sizes
    ("d_sae zero", lambda ws: ["--d-sae", "0"], "TranscoderConfig.d_sae", BEFORE),
    ("d_sae not a number", lambda ws: ["--d-sae", "abc"], "--d-sae", BEFORE),
    ("k zero", lambda ws: ["--k", "0"], "TranscoderConfig.k", BEFORE),
    ("k above d_sae", lambda ws: ["--k", "100"], "TranscoderConfig.k", BEFORE),
    ("batch_size zero", lambda ws: ["--batch-size", "0"], "TranscoderConfig.batch_size", BEFORE),
    ("total_tokens below a batch", lambda ws: ["--total-tokens", "10"], "TranscoderConfig.total_tokens", BEFORE),
    ("seq_len one", lambda ws: ["--seq-len", "1"], "TranscoderConfig.seq_len", BEFORE),
    ("model_batch_size zero", lambda ws: ["--model-batch-size", "0"], "TranscoderConfig.model_batch_size", BEFORE),
    ("buffer_tokens negative", lambda ws: ["--buffer-tokens", "-5"], "TranscoderConfig.buffer_tokens", BEFORE),
    ("lr zero", lambda ws: ["--lr", "0"], "TranscoderConfig.lr", BEFORE),
    ("min_lr above lr", lambda ws: ["--min-lr", "1"], "TranscoderConfig.min_lr", BEFORE),
    ("warmup longer than the run", lambda ws: ["--warmup-steps", "100"], "TranscoderConfig.warmup_steps", BEFORE),
    ("keep_checkpoints zero", lambda ws: ["--keep-checkpoints", "0"], "TranscoderConfig.keep_checkpoints", BEFORE),
    # prefixes
    ("prefixes not increasing", lambda ws: ["--prefix-sizes", "32", "16", "64"], "TranscoderConfig.prefix_sizes", BEFORE),
    ("prefixes not ending at d_sae", lambda ws: ["--prefix-sizes", "16", "32"], "TranscoderConfig.prefix_sizes", BEFORE),
    ("prefix of size zero", lambda ws: ["--prefix-sizes", "0", "64"], "TranscoderConfig.prefix_sizes", BEFORE),
    ("prefix_weights count", lambda ws: ["--prefix-sizes", "16", "64", "--prefix-weights", "1", "1", "1"],
     "TranscoderConfig.prefix_weights", BEFORE),
    ("prefix_weights negative", lambda ws: ["--prefix-weights", "-1"], "TranscoderConfig.prefix_weights", BEFORE),
    # dtypes and device
    ("dtype float8", lambda ws: ["--dtype", "float8"], "TranscoderConfig.dtype", BEFORE),
    ("model_dtype int8", lambda ws: ["--model-dtype", "int8"], "TranscoderConfig.model_dtype", BEFORE),
    ("activation_dtype half", lambda ws: ["--activation-dtype", "half"], "TranscoderConfig.activation_dtype", BEFORE),
    ("compute_dtype fp16", lambda ws: ["--compute-dtype", "fp16"], "TranscoderConfig.compute_dtype", BEFORE),
    ("device cuda without a GPU", lambda ws: ["--device", "cuda"], "device: cuda", BEFORE),
    ("device unknown", lambda ws: ["--device", "banana"], "device: unknown device 'banana'", BEFORE),
    # hooks and layers
    ("hook missing", lambda ws: ["--source-hook", "blocks.1.hook_nothing"], "hook 'blocks.1.hook_nothing'", AFTER),
    ("hook layer out of range", lambda ws: ["--target-hook", "blocks.9.hook_mlp_out"], "layer 9 is out of range", AFTER),
    ("hook empty", lambda ws: ["--source-hook", ""], "TranscoderConfig.source_hook", BEFORE),
    ("layer out of range", lambda ws: ["--layer", "7"], "layer 7 is out of range", AFTER),
    ("layer negative", lambda ws: ["--layer", "-1"], "--layer -1", BEFORE),
    # datasets
    ("dataset missing", lambda ws: ["--dataset", str(ws / "nope.jsonl")], f"dataset file {{ws}}/nope.jsonl", BEFORE),
    ("dataset without the text column", lambda ws: ["--dataset", str(ws / "no_text.jsonl")], "no column 'text'", BEFORE),
    ("text_column absent", lambda ws: ["--dataset", str(ws / "text.jsonl"), "--text-column", "body"],
     "no column 'body'", BEFORE),
    ("dataset not JSON lines", lambda ws: ["--dataset", str(ws / "broken.jsonl")], "dataset {ws}/broken.jsonl", BEFORE),
    ("dataset of empty texts", lambda ws: ["--dataset", str(ws / "blank_text.jsonl")], "{ws}/blank_text.jsonl", BEFORE),
    ("dataset file empty", lambda ws: ["--dataset", str(ws / "empty.jsonl")], "{ws}/empty.jsonl", BEFORE),
    ("dataset csv", lambda ws: ["--dataset", str(ws / "table.csv")], "dataset file {ws}/table.csv", BEFORE),
    ("dataset folder without files", lambda ws: ["--dataset", str(ws / "no_data")], "dataset folder {ws}/no_data", BEFORE),
    ("dataset hub id offline", lambda ws: ["--dataset", "no-such-org/no-such-dataset"], "no-such-org/no-such-dataset",
     BEFORE),
    # config files and other settings
    ("config missing", lambda ws: ["--config", str(ws / "nope.json")], "--config {ws}/nope.json", BEFORE),
    ("config malformed", lambda ws: ["--config", str(ws / "malformed.json")], "--config {ws}/malformed.json", BEFORE),
    ("config a JSON list", lambda ws: ["--config", str(ws / "list.json")], "--config {ws}/list.json", BEFORE),
    ("config unknown field", lambda ws: ["--config", str(ws / "unknown.json")], "d_sea", BEFORE),
    ("config bad value", lambda ws: ["--config", str(ws / "bad_lr.json")], "TranscoderConfig.lr", BEFORE),
    ("config wrong type", lambda ws: ["--config", str(ws / "bad_prefixes.json")], "TranscoderConfig.prefix_sizes",
     BEFORE),
    ("config betas not a pair", lambda ws: ["--config", str(ws / "bad_betas.json")], "TranscoderConfig.adam_betas",
     BEFORE),
    ("config a folder", lambda ws: ["--config", str(ws / "a_folder.json")], "--config {ws}/a_folder.json", BEFORE),
    ("preset unknown", lambda ws: ["--preset", "huge"], "preset 'huge'", BEFORE),
    ("wandb_mode unknown", lambda ws: ["--wandb-mode", "loud"], "TranscoderConfig.wandb_mode", BEFORE),
    ("wandb online without a key", lambda ws: ["--wandb-mode", "online"], "wandb_mode: online", BEFORE),
    ("kernels unknown", lambda ws: ["--kernels", "fast"], "TranscoderConfig.kernels", BEFORE),
    ("run_name with a slash", lambda ws: ["--run-name", "a/b"], "TranscoderConfig.run_name", BEFORE),
    ("model folder missing", lambda ws: ["--model-name", str(ws / "no_model")], "{ws}/no_model", BEFORE),
    ("model folder without config.json", lambda ws: ["--model-name", str(ws / "empty_model")], "{ws}/empty_model",
     BEFORE),
    # resume paths and damaged checkpoints
    ("resume path missing", lambda ws: ["--resume", str(ws / "step_5")], "--resume {ws}/step_5 does not exist", BEFORE),
    ("resume path a file", lambda ws: ["--resume", str(ws / "a_file")], "--resume {ws}/a_file", BEFORE),
    ("resume a run dir", lambda ws: ["--resume", str(ws / "trained")], "--resume {ws}/trained: a run dir", BEFORE),
    ("resume without meta.json", lambda ws: ["--resume", str(ws / "damaged/no_meta/step_30"), "--total-tokens", "1280"],
     "meta.json is missing", BEFORE),
    ("resume truncated weights", lambda ws: ["--resume", str(ws / "damaged/trunc_weights/step_30"),
                                             "--total-tokens", "1280"], "model.safetensors is damaged", BEFORE),
    ("resume zero-filled state", lambda ws: ["--resume", str(ws / "damaged/zero_state/step_30"),
                                             "--total-tokens", "1280"], "trainer_state.pt is damaged", BEFORE),
    ("resume truncated state", lambda ws: ["--resume", str(ws / "damaged/trunc_state/step_30"),
                                           "--total-tokens", "1280"], "trainer_state.pt is damaged", BEFORE),
    ("resume beyond the budget", lambda ws: ["--resume", str(ws / "trained/checkpoints/step_30")],
     "total_tokens: 640 tokens make 20 steps", BEFORE),
    ("resume another run's checkpoint", lambda ws: ["--resume", str(ws / "trained/checkpoints/step_30"), "--d-sae",
                                                    "128", "--total-tokens", "1280"], "d_sae: checkpoint has 64", AFTER),
    ("resume a path with two configs", lambda ws: ["--config", str(ws / "text_cfg.json"), "--config",
                                                   str(ws / "text_cfg.json"), "--resume", str(ws / "a_file")],
     "--resume {ws}/a_file: a checkpoint path resumes a single transcoder", BEFORE),
    ("every checkpoint damaged", lambda ws: ["--output-dir", str(ws / "all_damaged")],
     "{ws}/all_damaged/r/checkpoints/step_30: model.safetensors is damaged", BEFORE),
    ("auto resume beyond the budget", lambda ws: ["--output-dir", str(ws), "--run-name", "trained"],
     "total_tokens: 640 tokens make 20 steps", BEFORE),
    ("never over an old run", lambda ws: ["--output-dir", str(ws), "--run-name", "trained", "--resume", "never"],
     "--resume never: {ws}/trained", BEFORE),
    # output dirs
    ("output_dir a file", lambda ws: ["--output-dir", str(ws / "a_file")], "output_dir", BEFORE),
    ("output_dir below a file", lambda ws: ["--output-dir", str(ws / "a_file" / "runs")], "output_dir", BEFORE),
    ("output_dir read-only", lambda ws: ["--output-dir", "/sys/mtc-runs"], "output_dir", BEFORE),
    ("run dir is a file", lambda ws: ["--output-dir", str(ws / "blocked")], "run dir {ws}/blocked/r", BEFORE),
]


@pytest.mark.parametrize("case", BATTERY, ids=[case[0] for case in BATTERY])
def test_bad_input_exits_nonzero_naming_the_field_or_file(case, ws, model_loads, no_wandb_key, tiny_dirs,
                                                          tmp_path, capsys):
    _, extra, names, when = case
    args = train_args(tiny_dirs["gemma2"], tmp_path / "out", *extra(ws))
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code != 0, err[-2000:]
    assert "error: " in last and names.format(ws=ws) in last, err[-2000:]
    assert "Traceback" not in err
    assert (model_loads == []) == (when == BEFORE), f"expected to fail {when}; {len(model_loads)} model loads"


def test_the_battery_covers_every_kind_of_input():
    assert len(BATTERY) >= 45
    assert len({case[0] for case in BATTERY}) == len(BATTERY)
    before = sum(case[3] == BEFORE for case in BATTERY)
    assert before >= 0.9 * len(BATTERY)  # only hook, layer and width problems need the model
