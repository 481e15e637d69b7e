"""The toy with a known feature tree, the absorption metrics against it, and hierarchy from co-firing."""

import math

import pytest
import torch

from mtc import TranscoderConfig
from mtc.hierarchy import (CoFiring, FeatureTree, ToyHierarchyStore, absorption_rates, compare_on_toy, hierarchy,
                           hierarchy_report, toy_report)
from mtc.transcoder import MatryoshkaTranscoder

TREE = FeatureTree(n_parents=3, children_per_parent=3, p_parent=0.3, p_child=0.9)


def hand_built(store: ToyHierarchyStore, absorbing: bool) -> MatryoshkaTranscoder:
    """A transcoder with one latent per true feature (parents first, then children) built from the truth. Clean:
    every latent reads its feature (the dual basis of A) and writes its B row. Absorbing: a child's latent writes
    parent + child, and the parent's latent reads parent minus its children, so it is silent whenever a child fires."""
    tree, n = store.tree, store.tree.n_features
    dual = torch.linalg.pinv(store.A)  # [d_in, n]: x @ dual = f (up to the noise)
    W_enc, W_dec = dual.clone(), store.B.clone()
    if absorbing:
        for c in range(tree.n_parents, n):
            p = int(tree.parent_of[c])
            W_enc[:, p] -= dual[:, c]
            W_dec[c] = store.B[p] + store.B[c]
    cfg = TranscoderConfig(d_in=store.A.shape[1], d_out=store.B.shape[1], d_sae=n, prefix_sizes=[tree.n_parents, n],
                           k=2)
    model = MatryoshkaTranscoder(cfg)
    model.load_state_dict({"W_enc": W_enc, "b_enc": torch.zeros(n), "W_dec": W_dec, "b_dec": torch.zeros(cfg.d_out),
                           "threshold": torch.tensor(0.5)})
    return model


@pytest.fixture(scope="module")
def store():
    return ToyHierarchyStore(d_in=96, d_out=80, batch_size=512, tree=TREE, seed=3)


def test_absorption_scores_an_absorbing_dictionary_high_and_a_clean_one_near_zero(store):
    clean = toy_report(hand_built(store, absorbing=False), store, n_tokens=8192)
    absorbing = toy_report(hand_built(store, absorbing=True), store, n_tokens=8192)
    # both reconstruct the target: absorption does not show in the FVU
    assert clean["fvu"] < 0.02 and absorbing["fvu"] < 0.02
    assert clean["absorption_rate"] < 0.02
    assert absorbing["absorption_rate"] > 0.95
    assert all(rate > 0.9 for rate in absorbing["absorption_per_parent"])
    assert clean["contamination"] < 0.3 < 0.6 < absorbing["contamination"]
    # the truth is matched to the right latents in both (feature i is latent i)
    assert clean["per_feature"]["latent"] == list(range(TREE.n_features))
    assert absorbing["per_feature"]["latent"] == list(range(TREE.n_features))
    assert clean["parents_in_first_group"] == 1.0
    assert clean["matched_per_group"] == [{"parents": 3, "children": 0}, {"parents": 0, "children": 9}]
    # co-firing finds the tree in the clean dictionary only: the absorbing parents are silent with their children
    assert clean["hierarchy_share"] == 1.0 and clean["tree_found"] == 1.0
    assert absorbing["hierarchy_share"] == 0.0 and absorbing["tree_found"] == 0.0


def test_absorption_rates_per_parent_by_hand():
    parent_of = torch.tensor([-1, -1, 0, 0, 1])
    active = torch.tensor([[1, 0, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    match = torch.tensor([0, 1, 2, 3, 4])
    fires = active.clone()
    fires[0, 0] = False  # parent 0's latent silent on one of its two tokens with a child
    rates = absorption_rates(active, fires, parent_of, match)
    assert rates.tolist() == [0.5, 0.0]
    fires[3, 1] = False
    assert absorption_rates(active, fires, parent_of, match).tolist() == [0.5, 1.0]
    # a parent never seen with a child has no rate
    assert math.isnan(absorption_rates(active[:3], fires[:3], parent_of, match)[1])


def planted_firing(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """12 latents firing independently (rate 0.2), except latent 2 (rate 0.5) and latent 7, which fires only with
    latent 2, on 30% of its tokens (rate 0.15: rarer than the others)."""
    gen = torch.Generator().manual_seed(seed)
    fires = torch.rand(n_tokens, 12, generator=gen) < 0.2
    fires[:, 2] = torch.rand(n_tokens, generator=gen) < 0.5
    fires[:, 7] = fires[:, 2] & (torch.rand(n_tokens, generator=gen) < 0.3)
    return fires.float() * (1 + torch.rand(n_tokens, 12, generator=gen))


def test_cofiring_finds_a_planted_parent():
    W_dec = torch.randn(12, 16)
    cofiring = CoFiring(12)
    latents = planted_firing(20_000)
    for batch in latents.split(3000):
        cofiring.update(batch)
    assert cofiring.n_tokens == 20_000
    assert torch.equal(cofiring.counts, (latents > 0).sum(0).double())

    found = hierarchy(cofiring, [4, 8], W_dec)  # groups: latents 0-3, then 4-11
    assert found.latents.tolist() == list(range(4, 12))
    child = found.latents.tolist().index(7)
    assert found.parents[child] == 2 and found.p_parent[child] == 1.0
    assert found.lift[child] == pytest.approx(2.0, rel=0.05)  # 1 / P(latent 2 fires)
    others = [i for i in range(8) if i != child]
    assert (found.p_parent[others] < 0.6).all()  # independent latents: no parent reaches 0.9
    assert found.share == pytest.approx(1 / 8)
    cos = torch.nn.functional.cosine_similarity(W_dec[7], W_dec[2], dim=0)
    assert found.decoder_cos[child] == pytest.approx(float(cos), abs=1e-5)


def test_cofiring_pseudo_groups_of_a_plain_transcoder_order_by_frequency():
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))  # hide the planted pair among the latents
    latents = planted_firing(20_000)[:, perm]
    parent, child = int((perm == 2).nonzero()), int((perm == 7).nonzero())
    cofiring = CoFiring(12)
    cofiring.update(latents)
    order = cofiring.frequency_order()
    assert order[0] == parent  # the most frequent latent
    found = hierarchy(cofiring, [4, 8], torch.randn(12, 16), order=order)
    assert len(found.latents) == 8 and parent not in found.latents.tolist()
    assert order[-1] == child  # the least frequent: in the second pseudo-group
    i = found.latents.tolist().index(child)
    assert found.parents[i] == parent and found.p_parent[i] == 1.0


def test_toy_store_follows_its_tree():
    store = ToyHierarchyStore(d_in=32, d_out=24, batch_size=4096, tree=TREE, seed=0)
    f, x, y = store.held_out(4096)
    active = f > 0
    parents, children = active[:, :3], active[:, 3:].view(-1, 3, 3)  # [tokens, parent, child]
    assert not (children.any(2) & ~parents).any()  # a child only fires with its parent
    assert (children.sum(2) <= 1).all()  # siblings exclude each other
    assert parents.float().mean() == pytest.approx(TREE.p_parent, abs=0.02)
    assert (children.any(2) & parents).sum() / parents.sum() == pytest.approx(TREE.p_child, abs=0.02)
    assert active.float().sum(1).mean() == pytest.approx(TREE.mean_l0, rel=0.05)
    assert torch.allclose(y, f @ store.B) and (x - f @ store.A).std() == pytest.approx(TREE.noise, rel=0.05)
    assert torch.allclose(store.A.norm(dim=1), torch.ones(TREE.n_features))


def test_toy_store_is_deterministic_and_resumable():
    make = lambda seed=0: ToyHierarchyStore(d_in=32, d_out=24, batch_size=64, tree=TREE, seed=seed)  # noqa: E731
    first, second = make(), make()
    batches = [first.next_batch() for _ in range(4)]
    assert all(torch.equal(a.sources[0], b.sources[0]) and torch.equal(a.targets[0], b.targets[0])
               for a, b in zip(batches, [second.next_batch() for _ in range(4)]))
    assert not torch.equal(batches[0].sources[0], batches[1].sources[0])
    assert not torch.equal(make(seed=1).next_batch().sources[0], batches[0].sources[0])

    resumed = make()
    resumed.load_state_dict(first.state_dict() | {"batches_served": 2})
    assert torch.equal(resumed.next_batch().sources[0], batches[2].sources[0])
    assert resumed.state_dict() == {"batches_served": 3, "seed": 0}
    # held-out tokens are never served in training
    assert not torch.equal(make().held_out(64)[1], batches[0].sources[0])


@pytest.fixture
def one_thread():
    """Tiny matrices: one intra-op thread is fastest, and on a busy machine several threads spin-wait (3 s against
    a minute on two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_plain_and_matryoshka_train_on_the_toy_and_report(tmp_path, one_thread):
    tree = FeatureTree(n_parents=4, children_per_parent=3)
    reports = compare_on_toy(tmp_path, d_in=48, d_out=40, tree=tree, k=2, batch_size=256, total_tokens=256 * 150,
                             n_eval=2048)
    plain, matryoshka = reports["plain"], reports["matryoshka"]
    assert len(plain["fvu_per_prefix"]) == 1 and len(matryoshka["fvu_per_prefix"]) == 2
    for report in (plain, matryoshka):
        assert report["fvu"] == report["fvu_per_prefix"][-1] < 0.7  # learned something
        assert report["l0"] == pytest.approx(2, rel=0.35)  # the calibrated threshold keeps about k
        for key in ("absorption_rate", "recovery_enc", "recovery_dec", "parents_in_first_group", "tree_found",
                    "distinct_latents_matched"):
            assert 0 <= report[key] <= 1, key
        assert -1 <= report["contamination"] <= 1
        assert len(report["per_feature"]["latent"]) == tree.n_features
        assert len(report["absorption_per_parent"]) == 4 and len(report["contamination_per_child"]) == 12
        assert report["n_children"] <= 16 and "hierarchy_share" in report and "lift_mean" in report
    # the Matryoshka's inner prefix alone reconstructs less than the whole model
    assert matryoshka["fvu_per_prefix"][0] > matryoshka["fvu"]
    assert sum(g["parents"] + g["children"] for g in matryoshka["matched_per_group"]) == tree.n_features
    # the runs went through the real Trainer: final/ folders in raw units
    assert (tmp_path / "plain-seed0" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "matryoshka-seed0" / "final" / "model.safetensors").is_file()


def test_hierarchy_report_summarises_each_later_group():
    latents = planted_firing(20_000)  # latent 7 fires only with latent 2
    cofiring = CoFiring(12)
    cofiring.update(latents)
    report = hierarchy_report(cofiring, [4, 4, 4], torch.randn(12, 16), pseudo_groups=False)
    assert [g["group"] for g in report["groups"]] == [2, 3] and report["n_children"] == 8
    second, third = report["groups"]
    assert second["n_children"] == 4 and second["hierarchy_share"] == 0.25  # latent 7 of 4-7
    assert third["n_children"] == 4 and third["hierarchy_share"] == 0.0
    report = hierarchy_report(cofiring, [4, 8], torch.randn(12, 16), pseudo_groups=False)
    (group,) = report["groups"]
    assert group["hierarchy_share"] == pytest.approx(1 / 8) == report["hierarchy_share"]
    assert group["p_parent_histogram"][-1] == 1 and sum(group["p_parent_histogram"]) == 8
