"""lit_amdet.metrics against independent computations (pair counting, hand sums, explicit loops)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from lit_amdet.metrics import (
    auroc,
    classification_metrics,
    combine,
    combined_names,
    probability_metrics,
    rank_product,
    rank_union,
    ranking_metrics,
    ranks,
    recall_at_k,
    retrieves_first,
    value_summary,
)


def pair_auroc(scores, truth):
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_classification_metrics_by_hand():
    truth = [True, True, True, False, False]
    pred = [True, False, True, True, False]
    tp, fp, fn = 2, 1, 1
    m = classification_metrics(truth, pred)
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert classification_metrics([], []) == {"precision": None, "recall": None, "f1": None}
    assert classification_metrics([False, False], [False, False])["f1"] == 0.0


def test_probability_metrics_by_hand():
    truth = [True, False, True, False, True]
    p = [0.9, 0.4, 0.35, 0.1, 0.6]
    m = probability_metrics(truth, p, threshold=0.5)
    bce = -sum(math.log(q) if t else math.log(1 - q) for q, t in zip(p, truth)) / len(p)
    brier = sum((q - t) ** 2 for q, t in zip(p, truth)) / len(p)
    assert m["bce"] == pytest.approx(bce)
    assert m["brier"] == pytest.approx(brier)
    assert m["auroc"] == pytest.approx(pair_auroc(p, truth))
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == 1.0
    assert probability_metrics([True, True], [0.7, 0.8])["auroc"] is None


def test_auroc_of_raw_scores_any_scale():
    scores = [100.0, 3.0, -2.0, 57.0, 3.0]
    truth = [1, 0, 0, 1, 1]
    assert auroc(scores, truth) == pytest.approx(pair_auroc(scores, truth))
    assert auroc([1.0, 2.0], [0, 0]) is None


def test_value_summary():
    v = [3.0, None, 1.0, 2.0, 10.0]
    s = value_summary(v)
    kept = [3.0, 1.0, 2.0, 10.0]
    assert s == {"n": 4, "min": 1.0, "median": statistics.median(kept), "max": 10.0,
                 "mean": sum(kept) / 4, "std": statistics.pstdev(kept)}
    assert value_summary([None]) is None


def test_ranking_metrics_large_scores_and_ties():
    scores = np.array([20.0, 25.0, 25.0, 50.0, 1.0, 30.0])
    labels = np.array([0, 1, 0, 1, 0, 0], dtype=bool)
    m = ranking_metrics(scores, labels)
    assert m["auroc"] == pytest.approx(pair_auroc(scores.tolist(), labels.tolist()))
    # average precision over the distinct thresholds: sum over positives-bearing thresholds of dR * P
    order = sorted(set(scores.tolist()), reverse=True)
    ap, prev_recall = 0.0, 0.0
    for t in order:
        sel = scores >= t
        tp = (sel & labels).sum()
        recall, precision = tp / labels.sum(), tp / sel.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    assert m["pr_auc"] == pytest.approx(ap)
    assert ranking_metrics(scores, np.zeros(6, dtype=bool))["auroc"] is None


def test_ranks_break_ties_by_index():
    assert ranks(np.array([0.5, 2.0, 0.5, 3.0])).tolist() == [3, 2, 4, 1]


def test_rank_union_orders_by_best_then_second_rank():
    rng = np.random.default_rng(5)
    a, b, c = rng.normal(size=40), rng.normal(size=40), rng.normal(size=40)
    a[7] = b[7]  # values repeat across detectors: ranks, not scores, are compared
    for parts in ((a, b), (a, b, c)):
        # a loop: each sample's ranks (1 = most anomalous, ties to the lower index) sorted best first
        rank = [{i: r + 1 for r, i in enumerate(sorted(range(40), key=lambda i: (-s[i], i)))} for s in parts]
        keys = {i: sorted(r[i] for r in rank)[:2] for i in range(40)}
        want = sorted(range(40), key=lambda i: (*keys[i], i))
        assert (np.argsort(-rank_union(*parts), kind="stable")).tolist() == want
    # the top 2 of a two-detector union holds each one's first: what either flags, the union flags
    top = np.argsort(-rank_union(a, b), kind="stable")[:2]
    assert set(top) == {int(np.argmax(a)), int(np.argmax(b))} or int(np.argmax(a)) == int(np.argmax(b))
    np.testing.assert_array_equal(np.argsort(-rank_union(a), kind="stable"), np.argsort(-a, kind="stable"))
    # the guarantee a cut rests on: a sample some detector ranks r-th is within the union's first len(parts) * r
    for parts in ((a, b), (a, b, c)):
        best = np.min([ranks(s) for s in parts], axis=0)
        assert (ranks(rank_union(*parts)) <= len(parts) * best).all()
    with pytest.raises(ValueError):
        rank_union(a, b[:3])


def test_rank_product_is_the_geometric_mean_of_ranks():
    from scipy.stats import gmean, rankdata

    rng = np.random.default_rng(6)
    a, b, c = rng.normal(size=50), rng.normal(size=50), rng.normal(size=50)
    for parts in ((a, b), (a, b, c)):
        want = gmean(np.stack([rankdata(-s, method="ordinal") for s in parts]), axis=0)  # scipy's ranks and mean
        np.testing.assert_allclose(np.exp(-rank_product(*parts)), want, rtol=1e-12)
    np.testing.assert_array_equal(ranks(rank_product(a)), ranks(a))
    with pytest.raises(ValueError):
        rank_product(a, b[:3])


def test_combine_reads_sums_products_and_parentheses():
    rng = np.random.default_rng(7)
    s = {n: rng.normal(size=30) for n in ("dao", "xgroup", "kdist")}
    np.testing.assert_array_equal(combine("dao", s), s["dao"])
    np.testing.assert_array_equal(combine("dao+xgroup", s), rank_union(s["dao"], s["xgroup"]))
    np.testing.assert_array_equal(combine("(dao+xgroup)+dao*xgroup", s),  # a group is one operand of its union
                                  rank_union(rank_union(s["dao"], s["xgroup"]), rank_product(s["dao"], s["xgroup"])))
    np.testing.assert_array_equal(combine("kdist+dao*xgroup", s),  # * binds tighter
                                  rank_union(s["kdist"], rank_product(s["dao"], s["xgroup"])))
    np.testing.assert_array_equal(combine(" kdist * ( dao + xgroup ) ", s),
                                  rank_product(s["kdist"], rank_union(s["dao"], s["xgroup"])))
    assert combined_names("(dao+xgroup)+dao*xgroup") == ["dao", "xgroup"]
    for bad in ("", "dao+", "(dao+xgroup", "dao)", "dao xgroup", "dao-xgroup", "()", "+dao", "dao**xgroup"):
        with pytest.raises(ValueError):
            combined_names(bad)


def test_the_product_half_finds_what_two_detectors_both_rank_fairly_high():
    """Five poisons ranked 11th-15th by both detectors; ten clean outliers at the top of one detector each. A
    budget of 10 cut by the union holds none of the poisons, cut by (a+b)+a*b all of them."""
    rng = np.random.default_rng(8)
    n = 1000
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    a[:10], b[10:20] = 10 + np.arange(10), 10 + np.arange(10)  # clean: the top 10 of a, the top 10 of b
    poisons = np.arange(20, 25)
    a[poisons] = b[poisons] = 5 + np.arange(5) / 10  # 11th-15th in each
    s = {"a": a, "b": b}
    top = {e: set(np.argsort(-combine(e, s), kind="stable")[:10]) for e in ("a+b", "(a+b)+a*b")}
    assert not top["a+b"] & set(poisons)
    assert set(poisons) <= top["(a+b)+a*b"]


def test_recall_at_k_against_a_loop():
    torch.manual_seed(0)
    q, k = torch.randn(200, 8), torch.randn(200, 8)
    k[:50] = q[:50] + 0.01 * torch.randn(50, 8)
    got = recall_at_k(q, k, ks=(1, 5), block=100)
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    for kk in (1, 5):
        hits = 0
        for i in range(200):
            block = slice(i // 100 * 100, i // 100 * 100 + 100)
            sims = kn[block] @ qn[i]
            hits += int((sims > sims[i % 100]).sum()) < kk
        assert got[kk] == pytest.approx(hits / 200)


def test_retrieves_first_against_a_loop():
    """`retrieves_first` (the injection's attack-success top-1) against a per-query loop over cosines."""
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(50, 8, generator=g), torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    q[:5] = c[0] * 3  # some queries sit on the target itself
    got = retrieves_first(q, c)
    want = [float(max(range(6), key=lambda j: float(torch.nn.functional.cosine_similarity(q[i], c[j], dim=0))) == 0)
            for i in range(50)]
    assert got.tolist() == want and 5 <= sum(want) < 50
