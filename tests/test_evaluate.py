import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtc
from mtc import MatryoshkaTranscoder, TranscoderConfig
from mtc.data import load_documents, pack_contexts, split_documents
from mtc.evaluate import evaluate, format_table, held_out_contexts
from mtc.transcoder import fvu

HOOK = "blocks.1.hook_mlp_out"


def identity_transcoder(source=HOOK, target=HOOK, prefix_sizes=(64, 128)):
    """Latents relu(x) and relu(-x); decoding their difference gives x back exactly."""
    cfg = TranscoderConfig(source_hook=source, target_hook=target, d_in=64, d_out=64, d_sae=128,
                           prefix_sizes=list(prefix_sizes), k=8, dataset="pydoc", total_tokens=100_000, warmup_steps=0)
    model = MatryoshkaTranscoder(cfg)
    eye = torch.eye(64)
    with torch.no_grad():
        model.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        model.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        model.b_enc.zero_()
        model.b_dec.zero_()
        model.threshold.fill_(0.0)
    return model


@pytest.fixture(scope="module")
def contexts(gemma2_bridge):
    return held_out_contexts(gemma2_bridge, "pydoc", n_tokens=300, seq_len=32)


def test_splicing_the_true_target_scores_one_and_zero_ablation_scores_zero(gemma2_bridge, contexts):
    report = evaluate(identity_transcoder(), gemma2_bridge, contexts)
    full = report["full"]
    assert full["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert full["kl_div"] == pytest.approx(0.0, abs=1e-5)
    assert full["fvu"] == pytest.approx(0.0, abs=1e-8)
    assert report["ce_zero_ablation"] > report["ce_clean"]

    silent = identity_transcoder()
    with torch.no_grad():
        silent.W_dec.zero_()
    zero = evaluate(silent, gemma2_bridge, contexts)["full"]
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_div"] == pytest.approx(evaluate(silent, gemma2_bridge, contexts)["kl_zero_ablation"])


def test_splice_uses_the_source_of_the_same_forward_pass(gemma2_bridge, contexts):
    """A transcoder reading the MLP input and predicting the MLP output: splicing changes the loss by
    what the MLP's own output would have added, not by a stale or cached activation."""
    cross = identity_transcoder(source="blocks.1.hook_resid_mid", target=HOOK)
    report = evaluate(cross, gemma2_bridge, contexts)
    assert report["full"]["ce_loss_score"] != pytest.approx(1.0, abs=1e-3)
    tokens = contexts[:2]
    with torch.no_grad():
        clean, cache = gemma2_bridge.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_mid"])
        spliced = gemma2_bridge.run_with_hooks(tokens, fwd_hooks=[
            (HOOK, lambda value, hook: cache["blocks.1.hook_resid_mid"])])
    assert not torch.allclose(clean, spliced)


def test_per_prefix_numbers_use_only_that_prefix(gemma2_bridge, contexts):
    model = identity_transcoder()
    report = evaluate(model, gemma2_bridge, contexts)
    first = report["prefixes"][0]
    # prefix 1 holds relu(x) only: check its FVU independently
    with torch.no_grad():
        _, cache = gemma2_bridge.run_with_cache(contexts, names_filter=[HOOK])
    y = cache[HOOK][contexts != gemma2_bridge.tokenizer.bos_token_id]
    assert first["fvu"] == pytest.approx(float(fvu(y.double(), torch.relu(y).double())), rel=1e-5)
    assert first["l0"] == pytest.approx(float((y > 0).sum(-1).double().mean()), rel=1e-6)
    # changing latents outside prefix 1 changes nothing in prefix 1's row
    with torch.no_grad():
        model.W_dec[64:] *= 0.5
    again = evaluate(model, gemma2_bridge, contexts)["prefixes"][0]
    assert again == first
    assert "full" in format_table({"identity": report}) and "1" in format_table({"identity": report})


def test_held_out_contexts_never_appear_in_the_training_stream(gemma2_bridge, contexts):
    tokenizer = gemma2_bridge.tokenizer
    train = list(itertools.islice(pack_contexts(split_documents(load_documents("pydoc"), "train"), tokenizer, 32),
                                  3000))
    train_rows = {tuple(t.tolist()) for t in train}
    assert not any(tuple(c.tolist()) in train_rows for c in contexts)


def test_eval_cli_writes_report_and_plot(gemma2_bridge, tiny_dirs, tmp_path):
    model = identity_transcoder()
    model.cfg = model.cfg.replace(model_name=str(tiny_dirs["gemma2"]), seq_len=32)
    run = tmp_path / "run"
    mtc.save(model, run / "final")
    result = subprocess.run([sys.executable, "-m", "mtc", "eval", "--run", str(run), "--tokens", "200"],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run / "eval.json").read_text())
    assert report["full"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert (run / "eval.png").stat().st_size > 1000
    assert "ce_score" in result.stdout


def test_bos_is_never_replaced_in_spliced_runs(gemma2_bridge, contexts):
    """A transcoder that predicts garbage changes CE, but the BOS position keeps the model's own value:
    splicing a zero transcoder equals zero-ablating every position except BOS."""
    silent = identity_transcoder()
    with torch.no_grad():
        silent.W_dec.zero_()
    report = evaluate(silent, gemma2_bridge, contexts[:2])
    tokens = contexts[:2]
    keep = tokens != gemma2_bridge.tokenizer.bos_token_id
    with torch.no_grad():
        logits = gemma2_bridge.run_with_hooks(tokens, fwd_hooks=[
            (HOOK, lambda value, hook: torch.where(keep[..., None], torch.zeros_like(value), value))])
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
    ce = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0][keep[:, 1:]].double().mean()
    assert report["ce_zero_ablation"] == pytest.approx(float(ce), rel=1e-5)


def test_held_out_contexts_are_spread_over_the_held_out_text(gemma2_bridge):
    tokenizer = gemma2_bridge.tokenizer
    stream = list(itertools.islice(pack_contexts(split_documents(load_documents("pydoc"), "eval"), tokenizer, 32),
                                   40))
    chosen = held_out_contexts(gemma2_bridge, "pydoc", n_tokens=31 * 10, seq_len=32)
    assert len(chosen) == 10
    assert torch.equal(chosen[0], stream[0]) and torch.equal(chosen[-1], stream[39])
    assert not torch.equal(chosen[1], stream[1]), "not simply the first contexts"


def test_eval_interp_adds_the_cofiring_hierarchy_per_group(gemma2_bridge, tiny_dirs, tmp_path):
    model = identity_transcoder()  # group 2 holds relu(-x): each latent excludes its mirror in group 1
    model.cfg = model.cfg.replace(model_name=str(tiny_dirs["gemma2"]), seq_len=32)
    run = tmp_path / "run"
    mtc.save(model, run / "final")
    result = subprocess.run([sys.executable, "-m", "mtc", "eval", "--run", str(run), "--tokens", "200", "--interp",
                             "--absorption-words", "150", "--absorption-min-letters", "1"],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    hierarchy = json.loads((run / "eval.json").read_text())["hierarchy"]
    assert not hierarchy["pseudo_groups"] and hierarchy["group_sizes"] == [64, 64]
    (group,) = hierarchy["groups"]
    assert group["group"] == 2 and group["latents"] == 64
    assert sum(group["p_parent_histogram"]) == group["n_children"] > 0
    # the mirror latent never fires with its child, so no child's parent shares its (orthogonal) decoder direction
    assert group["parent_decoder_cos_mean"] == pytest.approx(0.0, abs=1e-6)
    assert (run / "eval_hierarchy.png").stat().st_size > 1000
    assert "prefix groups" in result.stdout
    absorbed = json.loads((run / "eval.json").read_text())["absorption"]
    assert absorbed["projection"] == "decoder" and absorbed["words"] == 150
    assert len(absorbed["probe_f1"]) == 26 and absorbed["letters_passing"] == len(absorbed["per_letter"])
    assert "first-letter absorption" in result.stdout
