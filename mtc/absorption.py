"""First-letter feature absorption, the maths: SAEBench's method (Chanin et al. 2024, "A is for Absorption"),
extended from SAEs to transcoders.

A linear probe on the source hook gives each first letter's true direction p. On the latents, k-sparse
probing finds each letter's main latents. On a word the probe recognises, the probe's projection P = x . p_hat
should be carried by those main latents; absorption is the share carried instead by other latents whose
decoder points along p. Every quantity is SAEBench 0.6's, with its thresholds (docs/evaluation.md):

    q_i = f_i * (d_i . p_hat)               latent i's share of P   (d_i: latent i's direction in x's space)
    M   = sum of q_i over the main latents
    T   = sum of the 3 largest q_i > 0 among other latents with cos(d_i, p_hat) >= 0.1
    absorption fraction = 0 if M >= P or T / P < 0.4; 1 if M <= 0; else A / (A + M), A = min(T, P - M)
    full absorption     = main latents silent, and the latent with the largest q has cos >= 0.025 and q >= 0.4 P

SAEBench reads `d_i` from the decoder, with rows scaled to unit norm and the norms folded into `f_i`. A
transcoder's decoder writes into the target's space, not x's, so here `d_i` is the row of a **source decoder**:
the least-squares map from the frozen latent codes back to x (`source_decoder`). For an SAE (source = target) it
is the decoder itself. The encoder directions are not used: where absorption happens an encoder carries
interference-cancelling terms (a parent's encoder learns to switch off on its absorbed child), so encoder and
decoder differ most exactly where this metric looks.
"""

from __future__ import annotations

import math
import string
import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

LETTERS = string.ascii_lowercase
# SAEBench 0.6's constants (sae_bench/evals/absorption/feature_absorption.py and main.py)
FULL_ABSORPTION_COS = 0.025
ABSORBER_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
SILENT = 1e-8
F1_JUMP = 0.03
MAX_K = 10


def train_probe(x: Float[Tensor, "n d"], labels: Int[Tensor, " n"], n_classes: int = len(LETTERS), *,
                epochs: int = 50, batch_size: int = 64, lr: float = 1e-2, end_lr: float = 1e-5,
                weight_decay: float = 1e-4, l1: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes `(W [n_classes, d], b [n_classes])`, trained as SAEBench trains its probes:
    BCE with each class's positives weighted by negatives/positives, Adam with weight decay, the rate decaying
    exponentially from `lr` to `end_lr` over the epochs, plus `l1 * mean over classes of |W|.sum()`."""
    x = x.detach().float()
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(x.shape[1])  # nn.Linear's initialisation, from a seeded generator
    W = ((torch.rand(n_classes, x.shape[1], generator=gen) * 2 - 1) * bound).requires_grad_()
    b = ((torch.rand(n_classes, generator=gen) * 2 - 1) * bound).requires_grad_()
    targets = F.one_hot(labels, n_classes).float()
    positives = targets.sum(0)
    pos_weight = (len(x) - positives) / positives.clamp(min=1)
    optimizer = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(math.log(end_lr / lr) / epochs))
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=gen).split(batch_size):
            logits = x[rows] @ W.T + b
            loss = F.binary_cross_entropy_with_logits(logits, targets[rows], pos_weight=pos_weight)
            if l1:
                loss = loss + l1 * W.abs().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return W.detach(), b.detach()


def f1_score(truth: Bool[Tensor, " n"], predicted: Bool[Tensor, " n"]) -> float:
    """F1 of the positive class (0 when there is nothing to find and nothing predicted)."""
    tp = int((truth & predicted).sum())
    wrong = int((truth ^ predicted).sum())
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def logistic_regression(x: Float[Tensor, "n k"], truth: Bool[Tensor, " n"], C: float = 1.0,
                        max_iter: int = 500) -> tuple[Tensor, float]:
    """Binary L2 logistic regression with balanced class weights, as scikit-learn's
    `LogisticRegression(class_weight="balanced", max_iter=500)` fits it (lbfgs, intercept not penalised)."""
    x = x.double()
    sign = truth.double() * 2 - 1
    n_pos = float(truth.sum())
    n_neg = len(truth) - n_pos
    sample_weight = torch.where(truth, len(truth) / (2 * max(n_pos, 1)), len(truth) / (2 * max(n_neg, 1)))
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        margin = sign * (x @ w[:-1] + w[-1])
        loss = 0.5 * w[:-1].pow(2).sum() + C * (sample_weight * F.softplus(-margin)).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    w = w.detach()
    return w[:-1].float(), float(w[-1])


def main_latents(sparse_weights: Float[Tensor, " d_sae"], codes_train: Float[Tensor, "n d_sae"],
                 truth_train: Bool[Tensor, " n"], codes_test: Float[Tensor, "m d_sae"], truth_test: Bool[Tensor, " m"],
                 max_k: int = MAX_K, jump: float = F1_JUMP) -> tuple[list[int], list[float]]:
    """A letter's main latents: the top k by the L1 probe's (signed) weight, k growing from 1 while a
    logistic probe on them gains more than `jump` test F1. Returns the latents and the F1 at each k tried."""
    order = sparse_weights.topk(max_k).indices
    chosen: list[int] = []
    scores: list[float] = []
    best = -100.0
    for k in range(1, max_k + 1):
        ids = order[:k]
        w, b = logistic_regression(codes_train[:, ids], truth_train)
        score = f1_score(truth_test, codes_test[:, ids] @ w + b > 0)
        scores.append(score)
        if score <= best + jump:
            break
        best, chosen = score, ids.tolist()
    return chosen, scores


def absorption(codes: Float[Tensor, "n d_sae"], projection: Float[Tensor, " n"],
               direction_dot: Float[Tensor, " d_sae"], direction_cos: Float[Tensor, " d_sae"],
               main: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per word: the absorption fraction, whether the letter is fully absorbed, and the top absorbing latent
    (-1 where none qualifies). `codes`: latent activations; `projection`: P = x . p_hat; `direction_dot` and
    `direction_cos`: each latent's direction in x's space dotted with p_hat, and its cosine to it."""
    q = codes * direction_dot
    is_main = torch.zeros(codes.shape[1], dtype=torch.bool)
    is_main[main] = True
    M = q[:, is_main].sum(1)
    candidate = (direction_cos >= ABSORBER_COS) & ~is_main
    q_absorbing = torch.where(candidate & (q > 0), q, torch.zeros_like(q))
    top = q_absorbing.topk(min(MAX_ABSORBERS, q.shape[1]), dim=1)
    T = top.values.sum(1)
    safe_P = torch.where(projection == 0, torch.ones_like(projection), projection)
    A = torch.minimum(T, projection - M)
    fraction = torch.where((M >= projection) | (T / safe_P < PROJECTION_SHARE) | (projection == 0),
                           torch.zeros_like(M),
                           torch.where(M <= 0, torch.ones_like(M), (A / (A + M)).clamp(0, 1)))
    q_top, top_latent = q.max(1)
    full = (codes[:, is_main] < SILENT).all(1) & (direction_cos[top_latent] >= FULL_ABSORPTION_COS) & \
        (projection >= 0) & (q_top >= PROJECTION_SHARE * projection) & (projection != 0)
    absorber = torch.where(top.values[:, 0] > 0, top.indices[:, 0], torch.full_like(top.indices[:, 0], -1))
    return fraction, full, absorber


@torch.no_grad()
def source_decoder(codes: Float[Tensor, "n d_sae"], x: Float[Tensor, "n d_in"],
                   ridge: float = 1e-3) -> Float[Tensor, "d_sae d_in"]:
    """Each latent's direction in the source space: the least-squares decoder from the frozen codes (with a
    bias) back to `x`, ridge-regularised by `ridge` times the mean squared code; latents that never fire get 0."""
    codes, x = codes.double(), x.double()
    sparse = codes.to_sparse()
    with warnings.catch_warnings():  # sparse @ sparse goes through the (beta) CSR layout
        warnings.simplefilter("ignore", UserWarning)
        gram = torch.sparse.mm(sparse.t(), sparse).to_dense()
    d_sae = gram.shape[0]
    total = codes.sum(0)
    system = torch.zeros(d_sae + 1, d_sae + 1, dtype=torch.float64)
    system[:d_sae, :d_sae] = gram
    system[:d_sae, d_sae] = system[d_sae, :d_sae] = total
    system[d_sae, d_sae] = len(x)
    strength = ridge * float(gram.diagonal().mean().clamp(min=1e-12))
    system[:d_sae, :d_sae] += strength * torch.eye(d_sae, dtype=torch.float64)
    silent = gram.diagonal() == 0
    system[:d_sae, :d_sae][silent, silent] = 1.0  # their rows solve to 0
    rhs = torch.cat([torch.sparse.mm(sparse.t(), x), x.sum(0, keepdim=True)])
    solution = torch.linalg.solve(system, rhs)
    return solution[:d_sae].float()
