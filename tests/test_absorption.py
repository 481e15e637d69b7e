import random

import pytest
import torch

from mtc.absorption import (absorption, f1_score, logistic_regression, main_latents, source_decoder,
                            train_probe)
from mtc.first_letter import TEMPLATE, alpha_words, first_letter, prompt, word_activations


def unit(v):
    return v / v.norm()


def letter_dictionary():
    """Latent 0 writes the letter direction p; latent 1 absorbs it (writes p + child); latent 2 is unrelated."""
    p, child, other = torch.eye(8)[:3]
    directions = torch.stack([p, unit(p + child), other])
    return p, directions


def test_absorption_scores_an_absorbing_latent_high_and_a_clean_one_zero():
    p, directions = letter_dictionary()
    dot, cos = directions @ p, (directions @ p) / directions.norm(dim=1)
    P = torch.tensor([1.0, 1.0, 1.0, 1.0])
    codes = torch.tensor([[1.0, 0.0, 0.3],  # the main latent carries the letter: clean
                          [0.0, 2 ** 0.5, 0.0],  # main silent, the absorber carries all of P: fully absorbed
                          [0.3, 0.7 * 2 ** 0.5, 0.0],  # main 0.3 of P, absorber 0.7: fraction 0.7
                          [0.0, 0.2 * 2 ** 0.5, 0.0]])  # absorber only 0.2 of P (< 0.4): not counted
    fraction, full, absorber = absorption(codes, P, dot, cos, main=[0])
    assert fraction.tolist() == pytest.approx([0.0, 1.0, 0.7, 0.0])
    assert full.tolist() == [False, True, False, False]
    assert absorber.tolist() == [-1, 1, 1, 1]


def test_an_absorber_must_point_along_the_probe():
    p, directions = letter_dictionary()
    directions[1] = unit(0.05 * p + torch.eye(8)[1])  # cosine 0.05 < 0.1: not an absorber
    dot, cos = directions @ p, (directions @ p) / directions.norm(dim=1)
    fraction, _, absorber = absorption(torch.tensor([[0.0, 30.0, 0.0]]), torch.tensor([1.0]), dot, cos, main=[0])
    assert fraction.item() == 0.0 and absorber.item() == -1


def test_f1_and_balanced_logistic_regression():
    truth = torch.tensor([True, True, False, False])
    assert f1_score(truth, torch.tensor([True, False, False, True])) == pytest.approx(0.5)
    assert f1_score(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=gen)
    rare = x[:, 1] > 1.2  # 12% positives: balanced weights still find them
    w, b = logistic_regression(x, rare)
    assert f1_score(rare, x @ w + b > 0) > 0.8
    assert w[1] > 5 * max(abs(w[0]), abs(w[2]))


def test_probes_find_letter_directions():
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(26, 32, generator=gen)
    labels = torch.arange(26).repeat(20)
    x = directions[labels] + 0.3 * torch.randn(len(labels), 32, generator=gen)
    W, b = train_probe(x, labels, epochs=20)
    predicted = (x @ W.T + b).argmax(1)
    assert (predicted == labels).float().mean() > 0.95


def test_main_latents_grow_while_f1_jumps():
    gen = torch.Generator().manual_seed(2)
    n = 600
    letter = torch.rand(n, generator=gen) < 0.2
    half = torch.rand(n, generator=gen) < 0.5
    codes = torch.rand(n, 12, generator=gen) * 0.1
    codes[:, 3] += (letter & half) * 2.0  # the letter is split over latents 3 and 7
    codes[:, 7] += (letter & ~half) * 2.0
    weights = torch.zeros(12)
    weights[3], weights[7], weights[5] = 1.0, 0.9, 0.5
    split = n // 2
    main, scores = main_latents(weights, codes[:split], letter[:split], codes[split:], letter[split:])
    assert main == [3, 7]
    assert scores[1] > scores[0] + 0.03 and len(scores) == 3  # k=3 (latent 5) adds nothing and stops the growth

    codes[:, 3] += (letter & ~half) * 2.0  # one latent now covers the whole letter
    main, _ = main_latents(weights, codes[:split], letter[:split], codes[split:], letter[split:])
    assert main == [3]


def test_source_decoder_recovers_the_directions_behind_sparse_codes():
    gen = torch.Generator().manual_seed(3)
    d_sae, d_in, n = 40, 16, 3000
    D = torch.randn(d_sae, d_in, generator=gen)
    codes = torch.rand(n, d_sae, generator=gen) * (torch.rand(n, d_sae, generator=gen) < 0.1)
    codes[:, 39] = 0  # a latent that never fires gets a zero direction
    x = codes @ D + torch.randn(d_in, generator=gen) + 0.01 * torch.randn(n, d_in, generator=gen)
    fitted = source_decoder(codes, x, ridge=1e-6)
    assert torch.allclose(fitted[:39], D[:39], atol=0.02)
    assert fitted[39].abs().max() == 0


def test_alpha_words_and_prompts_follow_saebench(gemma2_bridge):
    words = alpha_words(gemma2_bridge.tokenizer)
    assert len(words) > 30
    assert all(w.lstrip(" ").isalpha() and w.lstrip(" ").isascii() and not w.startswith("  ") for w in words)
    assert first_letter(" cat") == " C" and first_letter("Zoo") == " Z"
    text = prompt(" cat", words, random.Random(0))
    lines = text.split("\n")
    assert lines[0] == "" and len(lines) == 12 and lines[-1] == TEMPLATE.format(word=" cat")
    assert all(line.endswith(first_letter(line.split(" has the")[0])) for line in lines[1:-1])
    # the activation read is at the word's last token: same as reading that position in a plain forward pass
    texts = [prompt(w, words, random.Random(i)) for i, w in enumerate(words[:5])]
    acts = word_activations(gemma2_bridge, "blocks.0.hook_resid_post", texts, batch_size=2)
    tokenizer = gemma2_bridge.tokenizer
    for text, act in zip(texts, acts):
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
        _, cache = gemma2_bridge.run_with_cache(ids, names_filter=["blocks.0.hook_resid_post"])
        assert torch.allclose(cache["blocks.0.hook_resid_post"][0, -6], act, atol=1e-5)
