"""SAEBench's own first-letter feature-absorption eval on a SAELens-format SAE, offline, on Gemma-3-270M.

What it does
------------
Runs the code of PyPI `sae-bench` 0.6.0 (`sae_bench/evals/absorption/`), not a re-implementation:

1. `k_sparse_probing.run_k_sparse_probing_experiment` trains the ground-truth logistic-regression probe
   on `blocks.{layer}.hook_resid_post` at the word position (-6 for the template
   "{word} has the first letter:") and the k-sparse SAE-latent probes, k = 1..max_k.
2. If at least `--min-letters` letters have a probe F1 above `--min-f1` (SAEBench's
   `min_feats_for_eval` = 20 and `min_GT_probe_f1` = 0.6), `feature_absorption.run_feature_absortion_experiment`
   (sic) scores absorption word by word and `main._aggregate_results_df` aggregates it per letter.
3. As `main.run_eval` does, the unweighted means (and standard deviations) over the letters whose probe F1
   passes give `mean_absorption_fraction_score`, `mean_full_absorption_score` and `mean_num_split_features`.

Deviations from `main.run_eval`, all deliberate:

* The word list. SAEBench uses every alphabetic vocabulary token (`vocab.get_alpha_tokens`); for Gemma-3's
  262k vocabulary that is ~140k words, far too many for a CPU. `--words` names a JSON list of words (strings
  exactly as `get_alpha_tokens` returns them, e.g. " cat"); `get_alpha_tokens` is monkeypatched in every
  SAEBench module that imported it, so the probe data and the in-context examples both use that list.
  `--write-words N` writes a seeded random sample of `get_alpha_tokens(tokenizer)`, so another implementation
  can reuse the very same list. It drops the few words that are not one token in context (e.g. " yyyy": the
  absorption step refuses prompts of unequal length) and tops up letters with fewer than `--min-per-letter`
  words (rare letters such as x would otherwise be missing from the 80/20 train/test split, which crashes
  SAEBench's k-sparse code).
* `roc_auc_score` in `k_sparse_probing` returns NaN instead of raising when a letter has no test word (the
  AUC columns feed none of the absorption scores; SAEBench would crash).
* The LLM forward stops after `--layer` (`stop_at_layer=layer+1`): SAEBench only reads
  `blocks.{layer}.hook_resid_post`, so the numbers are unchanged and the 262k-wide unembedding is skipped.
  `--full-forward` turns this off.
* Decoder norms: loaded through SAELens (the default), the SAE's decoder norms are folded into its encoder and
  threshold (`fold_W_dec_norm`), as SAEBench's `load_and_format_sae` does for SAELens SAEs; a saved mtc model
  works on raw activations, so its decoder rows are not unit norm.
* Seeds: SAEBench uses Python's global `random` (word split, ICL examples) unseeded, and torch's RNG for
  probe initialisation and DataLoader shuffling; here `random`, `numpy` and `torch` are all seeded with `--seed`.
* Artifacts (probes, k-sparse and absorption results) go to a fresh temporary folder, or `--work-dir` which
  must be empty or new, so no stale cached probe is reused.

The model is built offline as a transformer-lens 3.x `HookedTransformer` from the local Hugging Face folder
(`--model-dir`); transformer-lens hard-codes the architecture of google/gemma-3-270m, so no hub config is
fetched. The script checks the HookedTransformer's logits against the HF model's on a short prompt and
records the max abs difference.

The SAE folder holds SAELens files `cfg.json` and `sae_weights.safetensors` (what `mtc.interop.export_saelens`
writes: architecture `jumprelu_transcoder`, `apply_b_dec_to_input` false, per-latent `threshold`). It loads
with `sae_lens.SAE.load_from_disk` (`--loader sae_lens`, the default) or with the small module below
(`--loader own`); either way the other one's `encode` is compared on random inputs as a check. The eval feeds
`blocks.{layer}.hook_resid_post` to `sae.encode` (SAEBench hard-codes that hook for the probe and the SAE),
whatever hook the SAE was trained on; a mismatch is warned about and recorded. `--hook` swaps that hook for
another one of the same block, for probe and SAE alike, by aliasing it in `run_with_cache`: a transformer-lens 3
hook name, `blocks.{layer}.mlp.hook_in` (mtc's transcoder input, the MLP input as transformer-lens 4 names it:
`ln2.hook_normalized * ln2.w` here, which matches HF's MLP input to 8e-6), or `sae` for the cfg's `hook_name`.
This is not SAEBench's eval any more, only its code on other activations.

Why a side virtualenv
---------------------
`sae-bench` 0.6.0 needs transformer-lens 3.x, numpy<2 and sae-lens 6; `mtc` needs transformer-lens 4. So this
script imports nothing from `mtc` and runs with the python of a separate venv:

    python -m venv /work/venvs/saebench
    /work/venvs/saebench/bin/pip install torch==2.13.0            # the CPU wheel
    /work/venvs/saebench/bin/pip install sae-bench torch==2.13.0
    /work/venvs/saebench/bin/pip uninstall -y torchvision           # the CUDA torchvision 0.28 wheel breaks
                                                                    # `import transformers` models (torchvision::nms);
                                                                    # nothing here needs it

Commands
--------
    PY=/work/venvs/saebench/bin/python
    # 1. a word list, reusable by another implementation
    $PY benchmarks/saebench_absorption.py --write-words 2000 --seed 0 --words /tmp/words.json \\
        --model-dir ~/.cache/mtc/gemma-3-270m
    # 2. the eval
    $PY benchmarks/saebench_absorption.py --sae SAE_DIR --layer 6 --words /tmp/words.json \\
        --model-dir ~/.cache/mtc/gemma-3-270m --seed 0 --min-f1 0.6 --min-letters 20 --out result.json
    # an mtc transcoder (reads blocks.6.mlp.hook_in) on its own input hook
    python -m mtc export saelens --run runs/quality/demo-matryoshka --out /tmp/demo_saelens   # system python
    $PY benchmarks/saebench_absorption.py --sae /tmp/demo_saelens --hook sae --words /tmp/words.json \
        --seed 0 --out demo.json --quiet

The output JSON holds `settings`, `letters_passing`, the three mean scores and their standard deviations,
`per_letter` (all 26 letters; `included` marks those entering the means) and `seconds`. When fewer than
`--min-letters` letters pass, SAEBench stops before the absorption step: the scores are null and
`evaluated` is false (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--quiet" in sys.argv:  # before torch/tqdm are imported: tqdm reads TQDM_* when its class is defined
    os.environ["TQDM_DISABLE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
RESID_POST = "blocks.{layer}.hook_resid_post"


# ---------------------------------------------------------------------- helpers
def default_model_dir() -> Path:
    """mtc's folder of the offline Gemma-3-270M (`mtc.language_model.cache_dir`, without importing mtc)."""
    if os.environ.get("MTC_CACHE_DIR"):
        return Path(os.environ["MTC_CACHE_DIR"]).expanduser() / "gemma-3-270m"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mtc" / "gemma-3-270m"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def first_letter(word: str) -> str:
    return [c for c in word.strip() if c.isalpha()][0].lower()


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def is_one_token_in_context(tokenizer, word: str, template: str) -> bool:
    """The word stays one token inside an ICL prompt line ("\\n{word} has the first letter:"), as " the" does."""
    def n_tokens(w: str) -> int:
        return len(tokenizer("\n" + template.format(word=w), add_special_tokens=False).input_ids)
    return n_tokens(word) == n_tokens(" the")


def write_words(args) -> None:
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    tokenizer = load_tokenizer(args.model_dir)
    vocab = get_alpha_tokens(tokenizer)
    rng = random.Random(args.seed)
    pool = vocab
    dropped = 0
    if not args.keep_multi_token:
        pool = [w for w in vocab if is_one_token_in_context(tokenizer, w, args.prompt_template)]
        dropped = len(vocab) - len(pool)
    if args.write_words > len(pool):
        raise SystemExit(f"--write-words {args.write_words} exceeds the {len(pool)} usable alphabetic tokens")
    words = rng.sample(pool, args.write_words)
    chosen = set(words)
    topped = {}
    for letter in LETTERS:
        have = sum(first_letter(w) == letter for w in words)
        if have < args.min_per_letter:
            extra = [w for w in pool if first_letter(w) == letter and w not in chosen]
            extra = rng.sample(extra, min(len(extra), args.min_per_letter - have))
            words += extra
            chosen.update(extra)
            topped[letter] = len(extra)
    Path(args.words).parent.mkdir(parents=True, exist_ok=True)
    Path(args.words).write_text(json.dumps(words, ensure_ascii=False, indent=0) + "\n")
    print(f"wrote {len(words)} words to {args.words} (sampled {args.write_words} of {len(pool)} usable of "
          f"{len(vocab)} alphabetic tokens, seed {args.seed}; dropped {dropped} multi-token words; "
          f"topped up {topped or 'no letters'} to {args.min_per_letter} per letter)")


# ---------------------------------------------------------------------- model
def load_model(model_dir: str, model_name: str, device: str):
    """A transformer-lens 3.x HookedTransformer built from the local HF folder, plus the logits check."""
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = HookedTransformer.from_pretrained_no_processing(
        model_name, hf_model=hf_model, tokenizer=tokenizer, dtype=torch.float32, device=device)
    model.eval()
    prompt = "The quick brown fox jumps over the lazy dog.\n cat has the first letter:"
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        hf_logits = hf_model(ids).logits.float()
        tl_logits = model(ids).float()
    check = {"prompt": prompt, "n_tokens": int(ids.shape[1]),
             "max_abs_diff": float((hf_logits - tl_logits).abs().max()),
             "max_abs_logit": float(hf_logits.abs().max()),
             "same_argmax": bool((hf_logits.argmax(-1) == tl_logits.argmax(-1)).all())}
    del hf_model, hf_logits, tl_logits
    return model, check


# ---------------------------------------------------------------------- SAE
class SAELensFolderSAE(nn.Module):
    """What SAEBench's absorption code touches of a `sae_lens.SAE`: `encode`, `W_enc [d_in, d_sae]`,
    `W_dec [d_sae, d_in]`, `device`, `dtype`, `cfg.d_sae`. Computes what SAELens computes for the cfg:
    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc; JumpReLU: relu(pre) * (pre > threshold)."""

    class _Cfg:
        def __init__(self, raw: dict):
            self.raw = raw
            self.d_in = raw["d_in"]
            self.d_sae = raw["d_sae"]
            self.architecture = raw.get("architecture")
            self.apply_b_dec_to_input = bool(raw.get("apply_b_dec_to_input", True))  # SAELens default

    def __init__(self, folder: str | Path, device: str = "cpu"):
        super().__init__()
        from safetensors.torch import load_file

        folder = Path(folder)
        raw = json.loads((folder / "cfg.json").read_text())
        self.cfg = self._Cfg(raw)
        arch = self.cfg.architecture
        if raw.get("normalize_activations", "none") not in ("none", None):
            raise ValueError(f"normalize_activations={raw['normalize_activations']!r} is not supported by --loader own")
        if arch not in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder", "standard", "transcoder"):
            raise ValueError(f"architecture {arch!r} is not supported by --loader own")
        t = load_file(str(folder / "sae_weights.safetensors"))
        self.W_enc = nn.Parameter(t["W_enc"].float(), requires_grad=False)
        self.W_dec = nn.Parameter(t["W_dec"].float(), requires_grad=False)
        self.b_enc = nn.Parameter(t["b_enc"].float(), requires_grad=False)
        self.b_dec = nn.Parameter(t["b_dec"].float(), requires_grad=False)
        self.jumprelu = arch.startswith("jumprelu")
        if self.jumprelu:
            self.threshold = nn.Parameter(t["threshold"].float(), requires_grad=False)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        acts = torch.relu(pre)
        return acts * (pre > self.threshold).to(acts.dtype) if self.jumprelu else acts


def load_sae(folder: str, loader: str, device: str):
    """The SAE SAEBench will use, and a check of SAELens's encode against ours on random inputs."""
    own = SAELensFolderSAE(folder, device)
    check: dict = {"loader": loader}
    sl_sae = None
    try:
        from sae_lens import SAE

        sl_sae = SAE.load_from_disk(folder, device=device).eval()
        check["sae_lens_class"] = type(sl_sae).__name__
    except Exception as exc:  # noqa: BLE001
        check["sae_lens_error"] = f"{type(exc).__name__}: {exc}"
        if loader == "sae_lens":
            raise
    if sl_sae is not None:
        g = torch.Generator().manual_seed(0)
        scale = float(own.W_enc.norm(dim=0).mean().reciprocal()) * 4  # puts some pre-activations over threshold
        x = torch.randn(64, own.cfg.d_in, generator=g).to(device) * scale
        with torch.no_grad():
            a, b = own.encode(x), sl_sae.encode(x)
        check["encode_max_abs_diff_own_vs_sae_lens"] = float((a - b).abs().max())
        check["encode_frac_nonzero"] = float((a != 0).float().mean())
    sae = sl_sae if loader == "sae_lens" else own
    if loader == "sae_lens":
        # as SAEBench's `load_and_format_sae` treats SAELens SAEs: decoder rows to unit norm, the norms folded into
        # the encoder and threshold, so that q_i = f_i * cos(W_dec_i, p) is latent i's part of the probe projection
        check["decoder_norm_range_before_fold"] = [float(sl_sae.W_dec.norm(dim=-1).min()),
                                                   float(sl_sae.W_dec.norm(dim=-1).max())]
        sl_sae.fold_W_dec_norm()
        check["folded_decoder_norms"] = True
    return sae, own.cfg.raw, check


# ---------------------------------------------------------------------- patches
def patch_sae_bench(words: list[str], model, layer: int, hook: str, full_forward: bool) -> list[str]:
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption
    import sae_bench.evals.absorption.k_sparse_probing as k_sparse_probing
    import sae_bench.evals.absorption.vocab as vocab
    from sklearn import metrics as sk_metrics

    patches = []

    def get_alpha_tokens(tokenizer, allow_leading_space=True, replace_special_chars=True):  # noqa: ARG001
        return list(words)

    for module in (vocab, common, feature_absorption):
        if hasattr(module, "get_alpha_tokens"):
            module.get_alpha_tokens = get_alpha_tokens
            patches.append(f"{module.__name__}.get_alpha_tokens -> --words list")

    class _Metrics:
        """sklearn.metrics, but roc_auc_score is NaN for a letter with no test word instead of raising."""

        def __getattr__(self, name):
            return getattr(sk_metrics, name)

        @staticmethod
        def roc_auc_score(y, pred, *a, **kw):
            if len(np.unique(y)) < 2:
                return float("nan")
            return sk_metrics.roc_auc_score(y, pred, *a, **kw)

    k_sparse_probing.metrics = _Metrics()
    patches.append("k_sparse_probing.metrics.roc_auc_score -> NaN when one class")

    resid_post = RESID_POST.format(layer=layer)
    cls_run_with_cache = type(model).run_with_cache
    if full_forward and hook == resid_post:
        return patches
    mlp_in_alias = hook == f"blocks.{layer}.mlp.hook_in"
    tl_hook = f"blocks.{layer}.ln2.hook_normalized" if mlp_in_alias else hook

    def run_with_cache(*model_args, names_filter=None, **kwargs):
        if not full_forward:
            kwargs.setdefault("stop_at_layer", layer + 1)
        if hook == resid_post:
            return cls_run_with_cache(model, *model_args, names_filter=names_filter, **kwargs)
        if list(names_filter or []) != [resid_post]:
            raise RuntimeError(f"unexpected names_filter {names_filter!r}")
        out, cache = cls_run_with_cache(model, *model_args, names_filter=[tl_hook], **kwargs)
        acts = cache[tl_hook]
        if mlp_in_alias:  # the MLP's input: RMSNorm output times its weight (TL3 hooks it before the weight)
            acts = acts * model.blocks[layer].ln2.w
        return out, {resid_post: acts}

    model.run_with_cache = run_with_cache
    if not full_forward:
        patches.append(f"model.run_with_cache(stop_at_layer={layer + 1})")
    if hook != resid_post:
        patches.append(f"model.run_with_cache: {resid_post} -> {hook}"
                       + (f" (= {tl_hook} * blocks.{layer}.ln2.w)" if mlp_in_alias else ""))
    return patches


# ---------------------------------------------------------------------- eval
def _num(x):
    if x is None:
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    x = float(x)
    return None if math.isnan(x) else x


def _stdev(xs):
    return statistics.stdev(xs) if len(xs) >= 2 else None


def run(args) -> dict:
    t_start = time.time()
    timings = {}
    words = json.loads(Path(args.words).read_text())
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise SystemExit(f"{args.words} must hold a JSON list of strings")
    counts = {c: sum(first_letter(w) == c for w in words) for c in LETTERS}

    raw_cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
    meta = {**raw_cfg, **(raw_cfg.get("metadata") or {})}
    sae_hook = meta.get("hook_name")
    layer = args.layer
    if layer is None:
        m = re.match(r"blocks\.(\d+)\.", sae_hook or "")
        if not m:
            raise SystemExit(f"--layer is needed: cfg hook_name {sae_hook!r} names no layer")
        layer = int(m.group(1))
    hook = RESID_POST.format(layer=layer) if args.hook is None else sae_hook if args.hook == "sae" else args.hook
    if not re.match(rf"blocks\.{layer}\.", hook or ""):
        raise SystemExit(f"--hook {hook!r} is not in block {layer}")
    warnings = []
    if sae_hook != hook:
        warnings.append(f"the SAE's hook_name is {sae_hook!r}, but the eval feeds it {hook}")
    if raw_cfg.get("d_in") and raw_cfg.get("d_out") and raw_cfg["d_in"] != raw_cfg.get("d_out"):
        warnings.append("d_in != d_out: the eval only uses the encoder")
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t = time.time()
    model, logits_check = load_model(args.model_dir, args.model_name, args.device)
    timings["load_model"] = time.time() - t
    if hook != f"blocks.{layer}.mlp.hook_in" and hook not in model.hook_dict:
        names = sorted(n for n in model.hook_dict if n.startswith(f"blocks.{layer}."))
        raise SystemExit(f"--hook {hook!r} is not a hook of this HookedTransformer: {names} "
                         f"(or blocks.{layer}.mlp.hook_in)")
    print(f"HookedTransformer vs HF logits: max abs diff {logits_check['max_abs_diff']:.3g} "
          f"(max |logit| {logits_check['max_abs_logit']:.3g})", flush=True)
    sae, _, sae_check = load_sae(args.sae, args.loader, args.device)
    print(f"SAE: {sae_check}", flush=True)

    import sae_bench
    import sae_lens
    import transformer_lens
    from importlib.metadata import version

    from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
    from sae_bench.evals.absorption.main import _aggregate_results_df

    patches = patch_sae_bench(words, model, layer, hook, args.full_forward)

    if args.work_dir:
        work = Path(args.work_dir)
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--work-dir {work} is not empty; give a new or empty folder")
        work.mkdir(parents=True, exist_ok=True)
        cleanup = False
    else:
        work = Path(tempfile.mkdtemp(prefix="saebench_absorption_"))
        cleanup = not args.keep_work_dir
    probes_dir, ksp_dir, abs_dir = work / "probes", work / "k_sparse_probing", work / "feature_absorption"
    sae_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.sae).resolve().name) or "sae"

    settings = {k: v for k, v in vars(args).items()}
    settings.update({"n_words": len(words), "words_per_letter": counts, "layer": layer, "hook": hook,
                     "sae_hook_name": sae_hook, "sae_architecture": raw_cfg.get("architecture"),
                     "d_in": raw_cfg.get("d_in"), "d_sae": raw_cfg.get("d_sae"), "work_dir": str(work),
                     "sae_name": sae_name, "patches": patches, "warnings": warnings,
                     "logits_check": logits_check, "sae_check": sae_check,
                     "versions": {p: version(p) for p in ("sae-bench", "sae-lens", "transformer-lens",
                                                          "transformers", "torch", "numpy")}})
    del sae_bench, sae_lens, transformer_lens

    torch.set_grad_enabled(True)  # as run_eval: the probes train with autograd
    seed_everything(args.seed)
    t = time.time()
    metrics_df = run_k_sparse_probing_experiment(
        model=model, sae=sae, layer=layer, sae_name=sae_name, force=True,
        max_k_value=args.max_k, f1_jump_threshold=args.f1_jump_threshold,
        prompt_template=args.prompt_template, prompt_token_pos=args.prompt_token_pos, device=args.device,
        experiment_dir=ksp_dir, probes_dir=probes_dir,
        k_sparse_probe_l1_decay=args.k_sparse_l1_decay, k_sparse_probe_batch_size=args.k_sparse_batch_size,
        k_sparse_probe_num_epochs=args.k_sparse_epochs, eval_batch_size=args.eval_batch_size,
        precalc_k_sparse_probe_sae_acts=args.precalc_sae_acts, verbose=True)
    timings["k_sparse_probing"] = time.time() - t

    f1 = {row["letter"]: float(row["f1_probe"]) for _, row in metrics_df.iterrows()}
    split = {row["letter"]: [int(i) for i in row["split_feats"]] for _, row in metrics_df.iterrows()}
    passing = [c for c in LETTERS if f1[c] > args.min_f1]
    result: dict = {"settings": settings, "letters_passing": len(passing), "letters_passing_list": passing,
                    "evaluated": len(passing) >= args.min_letters}

    agg = {}
    if result["evaluated"]:
        t = time.time()
        raw_df = run_feature_absortion_experiment(
            model=model, sae=sae, layer=layer, sae_name=sae_name, force=True, max_k_value=args.max_k,
            feature_split_f1_jump_threshold=args.f1_jump_threshold, prompt_template=args.prompt_template,
            prompt_token_pos=args.prompt_token_pos, batch_size=args.llm_batch_size, device=args.device,
            experiment_dir=abs_dir, sparse_probing_experiment_dir=ksp_dir, probes_dir=probes_dir)
        timings["feature_absorption"] = time.time() - t
        if len(raw_df):
            agg = {row["letter"]: row for _, row in _aggregate_results_df(raw_df).iterrows()}
    else:
        print(f"Cannot evaluate absorption: only {len(passing)} letters have probe F1 > {args.min_f1} "
              f"(need {args.min_letters}); SAEBench stops here", flush=True)

    per_letter, fracs, fulls, nsplits = [], [], [], []
    for c in LETTERS:
        row = agg.get(c)
        included = result["evaluated"] and c in passing and row is not None  # run_eval's rule
        entry = {"letter": c, "f1_probe": f1[c], "passes_f1": c in passing, "included": included,
                 "n_words": counts[c],
                 "mean_absorption_fraction": _num(row["mean_absorption_fraction"]) if row is not None else None,
                 "full_absorption_rate": _num(row["full_absorption_rate"]) if row is not None else None,
                 "num_full_absorption": _num(row["num_full_absorption"]) if row is not None else None,
                 "num_probe_true_positives": _num(row["num_probe_true_positives"]) if row is not None else None,
                 "num_split_features": int(row["num_split_feats"]) if row is not None else len(split[c]),
                 "split_feats": [int(i) for i in row["split_feats"]] if row is not None else split[c]}
        per_letter.append(entry)
        if included:
            fracs.append(float(row["mean_absorption_fraction"]))
            fulls.append(float(row["full_absorption_rate"]))
            nsplits.append(int(row["num_split_feats"]))
    result.update({
        "letters_included": len(fracs),
        "mean_absorption_fraction_score": statistics.mean(fracs) if fracs else None,
        "mean_full_absorption_score": statistics.mean(fulls) if fulls else None,
        "mean_num_split_features": statistics.mean(nsplits) if nsplits else None,
        "std_dev_absorption_fraction_score": _stdev(fracs),
        "std_dev_full_absorption_score": _stdev(fulls),
        "std_dev_num_split_features": _stdev(nsplits),
        "per_letter": per_letter,
        "timings": timings,
        "seconds": time.time() - t_start,
    })
    if cleanup:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(default_model_dir()),
                   help="local HF folder of the model (default: where mtc converts the offline Gemma-3-270M)")
    p.add_argument("--model-name", default="google/gemma-3-270m",
                   help="transformer-lens name giving the architecture (default google/gemma-3-270m)")
    p.add_argument("--words", required=True, help="JSON list of words (read, or written with --write-words)")
    p.add_argument("--write-words", type=int, metavar="N",
                   help="write a seeded random sample of N words of get_alpha_tokens(tokenizer) to --words and exit")
    p.add_argument("--min-per-letter", type=int, default=10,
                   help="--write-words: top up letters with fewer words than this (default 10; 0: plain sample)")
    p.add_argument("--keep-multi-token", action="store_true",
                   help="--write-words: keep words that are more than one token in context")
    p.add_argument("--seed", type=int, default=0, help="seeds random, numpy and torch (default 0)")
    p.add_argument("--sae", help="SAELens folder: cfg.json + sae_weights.safetensors")
    p.add_argument("--layer", type=int, help="reads blocks.{layer}.hook_resid_post (default: from cfg hook_name)")
    p.add_argument("--out", help="result JSON")
    p.add_argument("--hook", help="activations the probe and SAE read instead of SAEBench's fixed "
                   "blocks.{layer}.hook_resid_post: a transformer-lens 3 hook of that block, "
                   "blocks.{layer}.mlp.hook_in (the MLP input, as mtc/transformer-lens 4 name it), or 'sae' "
                   "(the cfg's hook_name). Default: SAEBench's resid_post")
    p.add_argument("--loader", choices=("sae_lens", "own"), default="sae_lens",
                   help="load the SAE with sae_lens.SAE.load_from_disk (default) or this script's module")
    p.add_argument("--min-f1", type=float, default=0.6, help="SAEBench min_GT_probe_f1 (default 0.6)")
    p.add_argument("--min-letters", type=int, default=20, help="SAEBench min_feats_for_eval (default 20)")
    p.add_argument("--max-k", type=int, default=10)
    p.add_argument("--f1-jump-threshold", type=float, default=0.03)
    p.add_argument("--prompt-template", default="{word} has the first letter:")
    p.add_argument("--prompt-token-pos", type=int, default=-6)
    p.add_argument("--k-sparse-l1-decay", type=float, default=0.01)
    p.add_argument("--k-sparse-batch-size", type=int, default=4096)
    p.add_argument("--k-sparse-epochs", type=int, default=50)
    p.add_argument("--eval-batch-size", type=int, default=24, help="k-sparse probe eval batch (default 24)")
    p.add_argument("--precalc-sae-acts", action="store_true", help="SAEBench precalc_k_sparse_probe_sae_acts")
    p.add_argument("--llm-batch-size", type=int, default=10, help="absorption-step LLM batch (default 10)")
    p.add_argument("--full-forward", action="store_true", help="run the whole model, not up to --layer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--work-dir", help="artifacts folder (new or empty; kept). Default: a temporary one, removed")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the temporary artifacts folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no sklearn warnings")
    args = p.parse_args(argv)
    if args.quiet:  # TQDM_DISABLE is set at the top of the file
        import warnings

        warnings.filterwarnings("ignore", module=r"sklearn\.")

    if args.write_words:
        write_words(args)
        return 0
    if not args.sae or not args.out:
        p.error("--sae and --out are needed (or --write-words)")
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=_num) + "\n")

    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    print(f"\n{args.sae} @ {result['settings']['hook']}: {result['settings']['n_words']} words, "
          f"{result['letters_passing']}/26 letters with probe F1 > {args.min_f1} (need {args.min_letters})")
    print(f"  mean_absorption_fraction_score {fmt(result['mean_absorption_fraction_score'])} "
          f"(sd {fmt(result['std_dev_absorption_fraction_score'])})")
    print(f"  mean_full_absorption_score     {fmt(result['mean_full_absorption_score'])} "
          f"(sd {fmt(result['std_dev_full_absorption_score'])})")
    print(f"  mean_num_split_features        {fmt(result['mean_num_split_features'])} "
          f"(sd {fmt(result['std_dev_num_split_features'])})")
    print(f"  {result['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
