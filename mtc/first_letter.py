"""First-letter absorption of a transcoder on a language model: prompts, activations and the report.

SAEBench 0.6's absorption eval, run on a transcoder's source hook (for an SAE of `hook_resid_post`, SAEBench's own
setting): words are the vocabulary's alphabetic tokens, each shown in a prompt of 10 examples
"{word} has the first letter: X", and read at the word's last token. A probe per letter is trained on 80% of
the words; letters whose probe reaches test F1 > 0.6 are scored with `mtc.absorption` on fresh prompts of the
test words the probe recognises. A CPU cannot afford Gemma's 10^5 alphabetic tokens, so `max_words` draws a
seeded sample (SAEBench uses them all). Which prefix group each letter's main latents and absorbers belong to
is counted too: a Matryoshka should keep the letters in its early groups.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from .absorption import LETTERS, absorption, f1_score, main_latents, source_decoder, train_probe
from .hierarchy import CoFiring, latent_groups
from .language_model import stop_layer
from .presets import matryoshka_prefixes
from .transcoder import MatryoshkaTranscoder

TEMPLATE = "{word} has the first letter:"
WORD_POSITION = -6  # the word's last token: then " has", " the", " first", " letter", ":"
ICL_EXAMPLES = 10
TRAIN_SHARE = 0.8


def alpha_words(tokenizer) -> list[str]:
    """The vocabulary's tokens made of ASCII letters only (one leading space allowed), as SAEBench takes them."""
    words = set()
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        bare = text[1:] if text.startswith(" ") else text
        if bare and bare.isascii() and bare.isalpha():
            words.add(text)
    return sorted(words)


def first_letter(word: str) -> str:
    return " " + next(c for c in word.strip() if c.isalpha()).upper()


def prompt(word: str, pool: list[str], rng: random.Random) -> str:
    """SAEBench's prompt: a newline, 10 examples from `pool` (never `word`), each on its own line, then `word`."""
    examples = rng.sample(pool, ICL_EXAMPLES)
    while word in examples:
        examples = rng.sample(pool, ICL_EXAMPLES)
    lines = [TEMPLATE.format(word=e) + first_letter(e) for e in examples]
    return "\n" + "\n".join(lines) + "\n" + TEMPLATE.format(word=word)


@torch.no_grad()
def word_activations(bridge, hook: str, prompts: list[str], batch_size: int = 32) -> Float[Tensor, "n d"]:
    """`hook`'s activation at each prompt's word (BOS first); prompts of one length share a forward pass."""
    tokenizer = bridge.tokenizer
    token_lists = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    token_lists = [[tokenizer.bos_token_id, *ids] for ids in token_lists]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(token_lists):
        by_length.setdefault(len(ids), []).append(i)
    out: Tensor | None = None
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            tokens = torch.tensor([token_lists[i] for i in chunk], device=bridge.cfg.device)
            _, cache = bridge.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop_layer([hook]))
            acts = cache[hook][:, WORD_POSITION].float().cpu()
            if out is None:
                out = torch.empty(len(prompts), acts.shape[-1])
            out[chunk] = acts
    assert out is not None, "no prompts"
    return out


@torch.no_grad()
def source_activations(bridge, hook: str, contexts: Tensor, batch_size: int = 4) -> Float[Tensor, "n d"]:
    """`hook`'s activations on every non-BOS token of `contexts [n, seq]`."""
    bos = bridge.tokenizer.bos_token_id
    parts = []
    for chunk in contexts.split(batch_size):
        _, cache = bridge.run_with_cache(chunk.to(bridge.cfg.device), names_filter=[hook],
                                         stop_at_layer=stop_layer([hook]))
        parts.append(cache[hook][chunk.to(cache[hook].device) != bos].float().cpu())
    return torch.cat(parts)


def probe_space(model: MatryoshkaTranscoder, x: Float[Tensor, "n d_in"]) -> tuple[Tensor, str]:
    """Each latent's direction in the source space: the decoder of an SAE, else the source decoder fitted on
    `x` (held-out activations of the source hook) with the codes frozen."""
    cfg = model.cfg
    if cfg.source_hook == cfg.target_hook and model.W_skip is None:
        return model.W_dec.detach().float().cpu(), "decoder"
    with torch.no_grad():
        codes = torch.cat([model.encode(part.to(model.W_enc)).float().cpu() for part in x.split(4096)])
    return source_decoder(codes, x.float()), "source_decoder"


def letter_index(word: str) -> int:
    return LETTERS.index(first_letter(word).strip().lower())


@dataclass
class FirstLetterProbe:
    """What does not depend on the transcoder: the words, their activations at the source hook, the letter probes
    `W [26, d_in]`, `b [26]` and their test F1, and for each passing letter the fresh activations of the test words
    its probe recognises (`fresh[c] = (word indices into test_words, activations)`). Every model compared on one
    hook is scored against the same probe and prompts."""

    hook: str
    words: list[str]
    test_words: list[str]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    W: Tensor
    b: Tensor
    f1: list[float]
    fresh: dict[int, tuple[list[int], Tensor]]
    seed: int
    min_f1: float


def probe_first_letters(bridge, hook: str, words: list[str], seed: int = 0, min_f1: float = 0.6,
                        batch_size: int = 32) -> FirstLetterProbe:
    """Split `words` 80/20 (seeded), read each at `hook` in a prompt of examples from its own split, train the
    letter probes, and read the recognised test words again in fresh prompts with examples from all `words`."""
    rng = random.Random(seed)
    shuffled = rng.sample(words, len(words))
    split = int(len(shuffled) * TRAIN_SHARE)
    train_words, test_words = shuffled[:split], shuffled[split:]
    x_train = word_activations(bridge, hook, [prompt(w, train_words, rng) for w in train_words], batch_size)
    x_test = word_activations(bridge, hook, [prompt(w, test_words, rng) for w in test_words], batch_size)
    y_train = torch.tensor([letter_index(w) for w in train_words])
    y_test = torch.tensor([letter_index(w) for w in test_words])
    W, b = train_probe(x_train, y_train, seed=seed)
    f1 = [f1_score(y_test == c, x_test @ W[c] + b[c] > 0) for c in range(len(LETTERS))]
    fresh = {}
    for c in range(len(LETTERS)):
        found = ((y_test == c) & (x_test @ W[c] + b[c] > 0)).nonzero().flatten().tolist()
        if f1[c] > min_f1 and found:
            fresh[c] = (found, word_activations(bridge, hook, [prompt(test_words[i], words, rng) for i in found],
                                                batch_size))
    return FirstLetterProbe(hook, words, test_words, x_train, y_train, x_test, y_test, W, b, f1, fresh, seed, min_f1)


def first_letter_absorption(model: MatryoshkaTranscoder, probe: FirstLetterProbe, directions: Tensor,
                            latent_group: Tensor, min_letters: int = 20) -> dict:
    """The absorption report of `model` (see the module docstring). `directions [d_sae, d_in]`: each latent's
    direction in the source space (`probe_space`); `latent_group [d_sae]`: its prefix group (0-based)."""
    norms = directions.norm(dim=1)

    def encode(x: Tensor) -> Tensor:  # scaled by each latent's direction norm, as SAEBench folds decoder norms
        with torch.no_grad():
            return model.encode(x.to(model.W_enc)).float().cpu() * norms

    codes_train, codes_test = encode(probe.x_train), encode(probe.x_test)
    W_sparse, _ = train_probe(codes_train, probe.y_train, batch_size=4096, weight_decay=1e-6, l1=0.01,
                              seed=probe.seed)
    letters, main_groups, absorber_groups = [], Counter(), Counter()
    for c, (found, fresh) in probe.fresh.items():
        main, sparse_f1 = main_latents(W_sparse[c], codes_train, probe.y_train == c, codes_test, probe.y_test == c)
        p_hat = probe.W[c] / probe.W[c].norm()
        dot = directions @ p_hat
        cos = dot / norms.clamp(min=1e-12)
        fraction, full, absorber = absorption(encode(fresh), fresh @ p_hat, cos, cos, main)
        groups = [int(latent_group[i]) + 1 for i in main]
        main_groups.update(groups)
        absorber_groups.update(int(latent_group[i]) + 1 for i in absorber[fraction > 0].tolist())
        letters.append({"letter": LETTERS[c], "probe_f1": probe.f1[c], "main_latents": main,
                        "sparse_probe_f1": sparse_f1, "main_groups": groups, "words": len(found),
                        "absorption_fraction": float(fraction.mean()),
                        "full_absorption_rate": float(full.float().mean())})

    def mean_sd(key: str) -> tuple[float, float]:
        values = [row[key] for row in letters]
        return (statistics.mean(values) if values else float("nan"),
                statistics.stdev(values) if len(values) > 1 else float("nan"))

    absorbed, absorbed_sd = mean_sd("absorption_fraction")
    full_rate, full_sd = mean_sd("full_absorption_rate")
    split_counts = [len(row["main_latents"]) for row in letters]
    return {"words": len(probe.words), "seed": probe.seed, "min_f1": probe.min_f1, "min_letters": min_letters,
            "letters_passing": len(letters), "enough_letters": len(letters) >= min_letters,
            "probe_f1": dict(zip(LETTERS, probe.f1)),
            "mean_absorption_fraction": absorbed, "std_absorption_fraction": absorbed_sd,
            "mean_full_absorption": full_rate, "std_full_absorption": full_sd,
            "mean_split_latents": statistics.mean(split_counts) if split_counts else float("nan"),
            "main_latents_by_group": dict(sorted(main_groups.items())),
            "absorbers_by_group": dict(sorted(absorber_groups.items())), "per_letter": letters}


def report_groups(model: MatryoshkaTranscoder, cofiring: CoFiring) -> tuple[Tensor, bool]:
    """Each latent's group (0-based) and whether the groups are pseudo-groups: a Matryoshka's own prefix groups,
    or a plain transcoder's latents ordered by firing frequency and cut into the groups the presets would give a
    Matryoshka of its width (as the hierarchy report cuts them)."""
    cfg = model.cfg
    if cfg.n_prefixes > 1:
        return latent_groups(torch.arange(cfg.d_sae), cfg.prefix_sizes), False
    rank = torch.empty(cfg.d_sae, dtype=torch.long)
    rank[cofiring.frequency_order().cpu()] = torch.arange(cfg.d_sae)
    return latent_groups(rank, matryoshka_prefixes(cfg.d_sae)), True


def sample_words(tokenizer, n_words: int, seed: int = 0) -> list[str]:
    """A seeded sample of `n_words` of the vocabulary's alphabetic tokens (all of them if there are fewer)."""
    words = alpha_words(tokenizer)
    return words if len(words) <= n_words else sorted(random.Random(seed).sample(words, n_words))


def absorption_report(model: MatryoshkaTranscoder, probe: FirstLetterProbe, x: Float[Tensor, "n d_in"],
                      cofiring: CoFiring, min_letters: int = 20) -> dict:
    """The eval report's `absorption`: first-letter absorption against `probe` (on the model's source hook), latent
    directions from `x` (held-out source activations; `probe_space`), groups from `report_groups`."""
    if probe.hook != model.cfg.source_hook:
        raise ValueError(f"the letter probe reads {probe.hook} but the model reads {model.cfg.source_hook}; "
                         "probe the model's source hook")
    groups, pseudo = report_groups(model, cofiring)
    directions, projection = probe_space(model, x)
    report = first_letter_absorption(model, probe, directions, groups, min_letters=min_letters)
    return {"projection": projection, "pseudo_groups": pseudo, **report}


def plot_absorption(reports: dict[str, dict], path: Path) -> Path:
    """Absorption per letter, and the prefix groups of the letters' main latents and of their top absorbers,
    one colour per report with an `absorption` section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = {name: r["absorption"] for name, r in reports.items() if "absorption" in r}
    letters = sorted({row["letter"] for a in reports.values() for row in a["per_letter"]})
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8), gridspec_kw={"width_ratios": [3, 1, 1]})
    width = 0.8 / max(len(reports), 1)
    for i, (name, a) in enumerate(reports.items()):
        per = {row["letter"]: row["absorption_fraction"] for row in a["per_letter"]}
        label = f"{name}: {a['mean_absorption_fraction']:.3f}"
        axes[0].bar([j + i * width for j in range(len(letters))], [per.get(c, 0.0) for c in letters], width,
                    label=label)
        for ax, key in ((axes[1], "main_latents_by_group"), (axes[2], "absorbers_by_group")):
            counts = {int(g): n for g, n in a[key].items()}
            ax.bar([g + i * width for g in counts], list(counts.values()), width,
                   label=name + (" (pseudo-groups)" if a["pseudo_groups"] else ""))
    axes[0].set_xticks(range(len(letters)), letters)
    axes[0].set_title("first-letter absorption fraction (mean over letters in the legend)")
    axes[1].set_title("main latents by prefix group")
    axes[2].set_title("top absorbers by prefix group")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
