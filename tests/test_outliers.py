"""Tests for lit_amdet.outliers against a brute-force numpy implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_amdet.outliers import (
    caption_group_mean,
    clip_score,
    dao_score,
    isolation_forest_score,
    kdist_score,
    knn,
    lid_score,
    lof_score,
    score_samples,
    slof_score,
    xmodal_score,
)

EPS = 1e-12


# ---------------------------------------------------------------------------
# brute-force reference (full distance matrix + stable argsort)
# ---------------------------------------------------------------------------


def brute_knn(x: np.ndarray, k: int, refs: np.ndarray | None = None, metric: str = "euclidean"):
    x = x.astype(np.float64)
    r = x if refs is None else refs.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
        full = 1.0 - x @ r.T
    else:
        full = np.sqrt(((x[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    if refs is None:
        np.fill_diagonal(full, np.inf)
    idx = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, idx, axis=1), idx


def brute_scores(dist: np.ndarray, idx: np.ndarray, ref_dist: np.ndarray | None = None):
    ref = dist if ref_dist is None else ref_dist

    def lid(a):
        k = a.shape[1]
        s = np.log((a + EPS) / (a[:, -1:] + EPS)).sum(1)
        return k / np.maximum(-s, EPS)

    kd = dist[:, -1]
    kd_ref = ref[:, -1]
    lid_ref = lid(ref)
    slof = np.empty(len(dist))
    dao = np.empty(len(dist))
    for i in range(len(dist)):
        ratios = [(kd[i] + EPS) / (kd_ref[j] + EPS) for j in idx[i]]
        slof[i] = np.mean(ratios)
        dao[i] = np.mean([lid_ref[j] * np.log(r) for j, r in zip(idx[i], ratios)])
    return {"kdist": kd, "lid": lid(dist), "slof": slof, "dao": dao}


def assert_scores_match(got: dict[str, torch.Tensor], want: dict[str, np.ndarray], rtol=1e-6):
    for name, w in want.items():
        g = got[name].double().numpy()
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6, err_msg=name)


def integer_data(seed: int = 0) -> np.ndarray:
    """Small-integer points: exact float arithmetic, many duplicates and ties."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(70, 3)).astype(np.float32)
    # A group of 20 identical points: a_k = 0 for k <= 19.
    return np.concatenate([x, np.full((20, 3), 7.0, dtype=np.float32)])


# ---------------------------------------------------------------------------
# knn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 16])
def test_knn_matches_brute_force_random(k):
    x = np.random.default_rng(1).normal(size=(60, 5))
    d, i = knn(torch.from_numpy(x), k=k, chunk_size=16)
    bd, bi = brute_knn(x, k)
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [3, 16])
def test_knn_ties_and_duplicates_exact(k):
    x = integer_data()
    d, i = knn(torch.from_numpy(x), k=k, chunk_size=32)
    bd, bi = brute_knn(x, k)
    # Exact arithmetic: tie-break by lowest index must agree exactly.
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-6)


def test_knn_self_exclusion_and_index_correctness():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    x[7] = x[3]  # exact duplicate of another point
    xt = torch.from_numpy(x)
    d, i = knn(xt, k=5, chunk_size=9)
    rows = torch.arange(len(x)).unsqueeze(1)
    assert not (i == rows).any()
    # Every returned index is the point at the returned distance (no row shift).
    recomputed = (xt.unsqueeze(1) - xt[i]).norm(dim=-1)
    torch.testing.assert_close(d, recomputed)
    # The duplicate is still a neighbour, at distance exactly 0.
    assert i[3, 0] == 7 and d[3, 0] == 0
    assert i[7, 0] == 3 and d[7, 0] == 0
    # Without exclusion each point is its own first neighbour.
    d0, i0 = knn(xt, k=1, exclude_self=False)
    assert d0.abs().max() == 0
    assert ((i0[:, 0] == torch.arange(len(x))) | (d0[:, 0] == 0)).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("ref_chunk_size", [None, 1, 4, 17])
def test_knn_chunked_equals_unchunked(chunk_size, ref_chunk_size):
    x = torch.from_numpy(integer_data(3))
    d_ref, i_ref = knn(x, k=6, chunk_size=len(x))
    d, i = knn(x, k=6, chunk_size=chunk_size, ref_chunk_size=ref_chunk_size)
    torch.testing.assert_close(d, d_ref, rtol=0, atol=0)
    torch.testing.assert_close(i, i_ref, rtol=0, atol=0)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_self_index_shards_equal_the_whole_search(metric):
    # self_index: a slice of the set searched against all of it, each query's own row excluded.
    # Exact ties (integer data) only for L2: cosines of parallel vectors tie only up to rounding.
    x = torch.from_numpy(integer_data(5) if metric == "euclidean"
                         else np.random.default_rng(5).normal(size=(90, 8)))
    d_all, i_all = knn(x, k=5, metric=metric, chunk_size=7)
    for lo, hi in [(0, 13), (13, 40), (40, len(x))]:
        d, i = knn(x[lo:hi], x, k=5, metric=metric, chunk_size=7, ref_chunk_size=11,
                   self_index=torch.arange(lo, hi))
        torch.testing.assert_close(i, i_all[lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(d, d_all[lo:hi])
    with pytest.raises(ValueError, match="self_index"):
        knn(x[:10], x, k=3, self_index=torch.arange(5))


def test_knn_against_a_subsample_excludes_each_query_itself():
    x = np.random.default_rng(6).normal(size=(50, 4))
    sub = np.array([3, 7, 11, 20, 21, 30, 41, 42, 45, 49])
    own = np.full(len(x), -1)
    own[sub] = np.arange(len(sub))
    d, i = knn(torch.from_numpy(x), torch.from_numpy(x[sub]), k=4, chunk_size=6, ref_chunk_size=3,
               self_index=torch.from_numpy(own))
    full = np.sqrt(((x[:, None] - x[sub][None]) ** 2).sum(-1))
    full[sub, np.arange(len(sub))] = np.inf  # a subsampled query is not its own neighbour
    bi = np.argsort(full, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(d.numpy(), np.take_along_axis(full, bi, 1), rtol=1e-10)


def test_knn_separate_references():
    rng = np.random.default_rng(4)
    q, r = rng.normal(size=(25, 4)), rng.normal(size=(40, 4))
    d, i = knn(torch.from_numpy(q), torch.from_numpy(r), k=7, chunk_size=6, ref_chunk_size=9)
    bd, bi = brute_knn(q, 7, refs=r)
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-10)


def test_knn_cosine():
    x = np.random.default_rng(5).normal(size=(50, 8))
    d, i = knn(torch.from_numpy(x), k=5, metric="cosine", chunk_size=13, ref_chunk_size=11)
    bd, bi = brute_knn(x, 5, metric="cosine")
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-8, atol=1e-12)
    # Scale invariance of the cosine metric.
    d2, i2 = knn(torch.from_numpy(x * 3.0), k=5, metric="cosine")
    torch.testing.assert_close(i2, i)
    torch.testing.assert_close(d2, d)


def test_knn_rejects_bad_k():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError):
        knn(x, k=5)
    knn(x, k=5, exclude_self=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn_cuda_matches_cpu():
    x = torch.from_numpy(np.random.default_rng(6).normal(size=(300, 16)))
    d, i = knn(x, k=8, chunk_size=64)
    dc, ic = knn(x.cuda(), k=8, chunk_size=64)
    torch.testing.assert_close(ic.cpu(), i)
    torch.testing.assert_close(dc.cpu(), d)


# ---------------------------------------------------------------------------
# detectors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 16])
def test_scores_match_brute_force_random(k):
    x = np.random.default_rng(7).normal(size=(60, 5))
    got = score_samples(torch.from_numpy(x), k=k, chunk_size=8)
    want = brute_scores(*brute_knn(x, k))
    assert_scores_match(got, want)


@pytest.mark.parametrize("k", [3, 16])
def test_scores_match_brute_force_duplicates(k):
    x = integer_data(8)
    got = score_samples(torch.from_numpy(x), k=k, chunk_size=17, ref_chunk_size=23)
    want = brute_scores(*brute_knn(x, k))
    assert_scores_match(got, want, rtol=1e-5)
    if k == 16:  # the 20-point duplicate group: a_k = 0 everywhere
        assert (got["kdist"][-20:] == 0).all()
        assert torch.allclose(got["slof"][-20:], torch.ones(20))


def test_scores_float_duplicates_are_finite():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(50, 4))
    x[30:50] = x[0]  # 21 copies of the same point
    got = score_samples(torch.from_numpy(x), k=16)
    want = brute_scores(*brute_knn(x, 16))
    assert_scores_match(got, want)


def test_scores_against_separate_references():
    rng = np.random.default_rng(10)
    q, r = rng.normal(size=(20, 4)), rng.normal(size=(45, 4))
    got = score_samples(torch.from_numpy(q), k=5, references=torch.from_numpy(r), chunk_size=7)
    bd, bi = brute_knn(q, 5, refs=r)
    rd, _ = brute_knn(r, 5)
    assert_scores_match(got, brute_scores(bd, bi, rd))


def test_individual_functions_match_score_samples():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(11))
    d, i = knn(x, k=5)
    got = score_samples(x, k=5)
    torch.testing.assert_close(kdist_score(d), got["kdist"])
    torch.testing.assert_close(lid_score(d), got["lid"])
    torch.testing.assert_close(slof_score(d, i), got["slof"])
    torch.testing.assert_close(dao_score(d, i), got["dao"])


def test_planted_isolated_points_rank_top():
    rng = np.random.default_rng(12)
    clean = rng.normal(size=(400, 8))
    directions = rng.normal(size=(5, 8))
    planted = 10.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    x = torch.from_numpy(np.concatenate([clean, planted]).astype(np.float32))
    scores = score_samples(x, ("kdist", "lid", "slof", "dao", "iforest", "lof"), k=16)
    expected = set(range(400, 405))
    for name in ("kdist", "slof", "dao", "iforest", "lof"):
        top = set(torch.topk(scores[name], 5).indices.tolist())
        assert top == expected, name
    assert all(torch.isfinite(s).all() for s in scores.values())


def test_baselines():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    x[0] = 20.0
    assert int(isolation_forest_score(x, seed=0).argmax()) == 0
    lof = lof_score(torch.from_numpy(x), k=10)
    assert int(lof.argmax()) == 0 and lof.shape == (100,)
    img = torch.from_numpy(rng.normal(size=(10, 6)))
    txt = torch.from_numpy(rng.normal(size=(10, 6)))
    want = -(img * txt).sum(1) / (img.norm(dim=1) * txt.norm(dim=1))
    torch.testing.assert_close(clip_score(img, txt), want)
    out = score_samples(img, ("clip",), text_embeddings=txt)
    torch.testing.assert_close(out["clip"], want)
    with pytest.raises(ValueError):
        score_samples(img, ("clip",))
    with pytest.raises(ValueError):
        score_samples(img, ("nope",))


def test_subsampled_scores_average_exact_scores_against_each_subsample():
    x = torch.from_numpy(np.random.default_rng(7).normal(size=(60, 5)))
    got = score_samples(x, ("kdist", "lid", "slof", "dao"), 4, reference_size=20, reference_draws=3, seed=5)
    g = torch.Generator().manual_seed(5)
    want = {name: np.zeros(60) for name in got}
    for _ in range(3):  # brute force: each subsample scored as a reference set, own rows excluded
        rows = torch.randperm(60, generator=g)[:20].numpy()
        full = np.sqrt(((x.numpy()[:, None] - x.numpy()[rows][None]) ** 2).sum(-1))
        full[rows, np.arange(20)] = np.inf
        idx = np.argsort(full, axis=1, kind="stable")[:, :4]
        ref_d, _ = brute_knn(x.numpy()[rows], 4)
        for name, v in brute_scores(np.take_along_axis(full, idx, 1), idx, ref_d).items():
            want[name] += v / 3
    for name in got:
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-8, err_msg=name)


def test_subsampling_unmasks_a_clump_of_outliers():
    # 40 near-identical far points (a shared trigger and caption) are each other's neighbours for k = 16;
    # against subsamples of 100 of the 1,040 points only about 4 of them remain in each neighbourhood
    rng = np.random.default_rng(8)
    clean = rng.normal(size=(1000, 8))
    clump = 6.0 + 0.01 * rng.normal(size=(40, 8))
    x = torch.from_numpy(np.concatenate([clean, clump]))
    labels = np.r_[np.zeros(1000, bool), np.ones(40, bool)]
    from sklearn.metrics import roc_auc_score

    whole = score_samples(x, ("slof", "dao"), 16)
    sub = score_samples(x, ("slof", "dao"), 16, reference_size=100, reference_draws=4)
    for name in ("slof", "dao"):
        assert roc_auc_score(labels, whole[name].numpy()) < 0.6, name  # masked
        assert roc_auc_score(labels, sub[name].numpy()) > 0.95, name


def _brute_xmodal(image: np.ndarray, text: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Each caption's mean cosine to the captions of its image's k nearest images (by Euclidean distance, ties to
    the lower row; itself excluded), negated, against ``rows`` (default: every row)."""
    rows = np.arange(len(image)) if rows is None else rows
    d = np.sqrt(((image[:, None] - image[rows][None]) ** 2).sum(-1))
    d[rows, np.arange(len(rows))] = np.inf  # a sample is not its own neighbour
    nb = rows[np.argsort(d, axis=1, kind="stable")[:, :k]]
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    return -np.einsum("nd,nkd->nk", t, t[nb]).mean(1)


def test_xmodal_matches_brute_force_whole_set_and_subsamples():
    rng = np.random.default_rng(21)
    image = rng.normal(size=(80, 6))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = rng.normal(size=(80, 5))
    image[10:14] = image[3]  # duplicates: ties broken by row, as the search does
    got = xmodal_score(torch.from_numpy(image), torch.from_numpy(text), 5, chunk_size=7)
    np.testing.assert_allclose(got.numpy(), _brute_xmodal(image, text, 5), rtol=1e-10)
    got = xmodal_score(torch.from_numpy(image), torch.from_numpy(text), 4, reference_size=25, reference_draws=3,
                       seed=4)
    g, want = torch.Generator().manual_seed(4), np.zeros(80)
    for _ in range(3):  # the draws of score_samples with the same seed
        want += _brute_xmodal(image, text, 4, torch.randperm(80, generator=g)[:25].numpy()) / 3
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    out = score_samples(torch.from_numpy(image), ("xmodal",), 4, text_embeddings=torch.from_numpy(text),
                        reference_size=25, reference_draws=3, seed=4)
    np.testing.assert_allclose(out["xmodal"].numpy(), want, rtol=1e-10)
    with pytest.raises(ValueError, match="text_embeddings"):
        score_samples(torch.from_numpy(image), ("xmodal",))


def _captioned_clusters(seed: int):
    """1,200 images in 30 clusters, each cluster's captions alike: the generator (to go on drawing from), each
    image's cluster, the clusters' captions, the images and their captions."""
    rng = np.random.default_rng(seed)
    centres, captions = rng.normal(size=(30, 16)), rng.normal(size=(30, 12))
    which = rng.integers(0, 30, size=1200)
    image = centres[which] + 0.3 * rng.normal(size=(1200, 16))
    text = captions[which] + 0.3 * rng.normal(size=(1200, 12))
    return rng, which, captions, image, text


def test_xmodal_finds_a_caption_that_disagrees_with_its_images_neighbours():
    # 30 clusters of images, each captioned alike; 12 images of the clusters carry one foreign caption (a poison
    # pairs an image with the attacker's caption, not with what it shows) and sit among the clean images. DAO sees
    # nothing: the poisoned images are where clean images are.
    rng, which, captions, image, text = _captioned_clusters(3)
    poisons = rng.choice(1200, size=12, replace=False)
    text[poisons] = rng.normal(size=12)[:, None] * 0.01 + rng.normal(size=(1, 12))  # one target caption
    labels = np.zeros(1200, bool)
    labels[poisons] = True
    from sklearn.metrics import roc_auc_score

    x, t = torch.from_numpy(image), torch.from_numpy(text)
    sub = score_samples(x, ("xmodal", "dao"), 8, text_embeddings=t, reference_size=200, reference_draws=4)
    assert roc_auc_score(labels, sub["xmodal"].numpy()) > 0.99
    assert roc_auc_score(labels, sub["dao"].numpy()) < 0.8


def _brute_group_mean(scores: np.ndarray, text: np.ndarray, k: int, same: float,
                      rows: list[np.ndarray] | None = None) -> np.ndarray:
    """Each score averaged with the scores of the captions among its caption's k nearest (cosine, itself
    excluded) in each of ``rows`` (default: the whole set once) that are at least ``same`` close, all pooled."""
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    total, count = scores.copy(), np.ones(len(t))
    for r in rows if rows is not None else [np.arange(len(t))]:
        cos = t @ t[r].T
        cos[r, np.arange(len(r))] = -np.inf  # not itself
        nb = np.argsort(-cos, axis=1, kind="stable")[:, :k]
        c = np.take_along_axis(cos, nb, axis=1)
        total += ((c >= same) * scores[r][nb]).sum(1)
        count += (c >= same).sum(1)
    return total / count


def test_caption_group_mean_matches_brute_force_whole_set_and_subsamples():
    rng = np.random.default_rng(8)
    text = rng.normal(size=(90, 5))
    text[20:24] = text[2]  # the same caption four more times (exact ties: the lower row first, as the search)
    text[40] = text[41] + 0.05 * rng.normal(size=5)  # a near copy
    scores = rng.normal(size=90)
    for same in (0.9, 0.5):
        got = caption_group_mean(torch.from_numpy(scores), torch.from_numpy(text), 6, same_caption=same,
                                 chunk_size=7)
        np.testing.assert_allclose(got.numpy(), _brute_group_mean(scores, text, 6, same), rtol=1e-10)
    g = torch.Generator().manual_seed(5)
    draws = [torch.randperm(90, generator=g)[:30].numpy() for _ in range(3)]
    got = caption_group_mean(torch.from_numpy(scores), torch.from_numpy(text), 4, same_caption=0.8,
                             reference_size=30, reference_draws=3, seed=5)
    np.testing.assert_allclose(got.numpy(), _brute_group_mean(scores, text, 4, 0.8, draws), rtol=1e-10)
    with pytest.raises(ValueError, match="same_caption"):
        caption_group_mean(torch.from_numpy(scores), torch.from_numpy(text), 4, same_caption=1.5)


def test_xgroup_is_xmodal_when_no_two_captions_say_the_same():
    rng = np.random.default_rng(9)
    image, text = torch.from_numpy(rng.normal(size=(60, 6))), torch.from_numpy(rng.normal(size=(60, 8)))
    out = score_samples(image, ("xmodal", "xgroup"), 5, text_embeddings=text, reference_size=20, reference_draws=2)
    assert torch.equal(out["xgroup"], out["xmodal"])  # random 8-d captions: none within cosine 0.95
    with pytest.raises(ValueError, match="xgroup"):
        score_samples(image, ("xgroup",))


def test_xgroup_pools_the_noisy_votes_of_poisons_that_share_a_caption():
    # 30 clusters captioned alike; 40 clean pairs carry another cluster's caption (caption noise, each its own:
    # xmodal ranks them as high as poisons), and 15 poisons share one target caption that is half like three
    # clusters' captions, so a poison whose image sits in one of those clusters looks consistent on its own.
    rng, which, captions, image, text = _captioned_clusters(0)
    noisy = rng.choice(1200, size=55, replace=False)
    hard, poisons = noisy[:40], noisy[40:]
    text[hard] = captions[(which[hard] + 1 + rng.integers(0, 29, size=40)) % 30] + 0.3 * rng.normal(size=(40, 12))
    text[poisons] = captions[:3].mean(0) + 0.5 * rng.normal(size=12)
    labels = np.zeros(1200, bool)
    labels[poisons] = True
    from sklearn.metrics import roc_auc_score

    out = score_samples(torch.from_numpy(image), ("xmodal", "xgroup"), 8, text_embeddings=torch.from_numpy(text),
                        reference_size=200, reference_draws=4)
    top = {name: len(set(torch.argsort(s, descending=True)[:15].tolist()) & set(poisons.tolist()))
           for name, s in out.items()}
    assert top["xmodal"] <= 5 and top["xgroup"] >= 8, top
    assert roc_auc_score(labels, out["xgroup"].numpy()) > 0.99 > roc_auc_score(labels, out["xmodal"].numpy())
