"""Density-ratio local outlier detectors for backdoor-sample detection.

Implements the detectors studied in "Detecting Backdoor Samples in Contrastive
Language Image Pretraining" (Huang et al., ICLR 2025): k-distance, LID (MLE),
SLOF and DAO, plus Isolation Forest / LOF / CLIP-score baselines. Every score
follows the same convention: **higher = more anomalous**.

Notation: for a point ``x`` and a reference set ``R``, ``a_i(x)`` is the
distance from ``x`` to its ``i``-th nearest neighbour in ``R`` (``x`` itself
excluded when ``x`` is in ``R``), ``i = 1..k``.

* k-distance: ``a_k(x)``.
* LID (MLE): ``-k / sum_{i=1..k} log((a_i + eps) / (a_k + eps))``. The ``i=k``
  term is ``log 1 = 0`` (so effectively ``k-1`` non-zero terms, scaled by
  ``k``); ``eps`` keeps the log finite for zero distances (duplicates), and the
  negated sum is clamped at ``eps`` so that ``k`` exact duplicates (all ratios
  equal to 1) give a large finite value instead of ``inf``.
* SLOF: ``mean_{j in kNN(x)} (a_k(x) + eps) / (a_k(x_j) + eps)``.
* DAO: ``mean_{j in kNN(x)} LID(x_j) * log((a_k(x) + eps) / (a_k(x_j) + eps))``
  (SPEC §4's log form, ``dao_form="log"``), or the DAO paper's own power form
  ``mean_j ((a_k(x) + eps) / (a_k(x_j) + eps)) ** LID(x_j)`` (Anderberg et al.,
  SDM 2024; ``dao_form="power"``), reported as its logarithm: the same ranking,
  and no overflow (LIDs of 10-50 raise ratios of a few to beyond float32).
* xmodal (cross-modal disagreement): ``-mean_{j in kNN_image(x)} cos(t(x), t(x_j))``,
  how unlike a pair's caption is to the captions of its image's ``k`` nearest
  images. A poison pairs an image with the attacker's caption, not with what
  the image shows, so images like it carry other captions; the kNN-label
  consistency filter of noisy-label learning (Peri et al., "Deep k-NN defense
  against clean-label data poisoning", 2020), with captions as labels. It reads
  both towers' embeddings, not the sample features.
* xgroup (caption-group disagreement): xmodal averaged over the pair and the
  pairs whose captions say the same thing (cosine >= ``same_caption``, 0.95,
  among its caption's ``k`` nearest captions). A backdoor needs many poisons
  with one target caption, and each poison's xmodal is a noisy vote (its image
  may sit by clean images whose captions happen to resemble the target); the
  group's mean is the vote of all the poisons the search finds, as averaging
  ``m`` noisy votes shrinks their spread by ``sqrt(m)``. A clean caption's
  group is clean pairs whose images agree with their neighbours'. An attacker
  who gives every poison its own caption leaves each group to one poison:
  xgroup then falls back to that poison's xmodal (and to clean look-alikes'
  votes where the caption is a clean one).

Neighbours are exact and global over the whole set (`lit_amdet.neighbours`:
chunked matrix products, in one process or spread over several). The
published reference code differs (``variant="reference"`` reproduces it, see
`reference_code_scores`): its neighbour indices are shifted by one row after
dropping the self column, it mixes ``a_k`` and ``a_{k+1}``, and it searches each
mini-batch on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lit_amdet.neighbours import Metric, NeighbourSearch, float_matrix, knn

__all__ = [
    "DAO_FORMS",
    "DETECTORS",
    "PAIR_DETECTORS",
    "VARIANTS",
    "caption_group_mean",
    "check_reference_size",
    "check_same_caption",
    "clip_score",
    "dao_score",
    "isolation_forest_score",
    "kdist_score",
    "knn",
    "lid_score",
    "lof_score",
    "reference_code_scores",
    "score_samples",
    "slof_score",
    "xmodal_score",
]

#: Detector names understood by :func:`score_samples`.
DETECTORS: tuple[str, ...] = ("kdist", "lid", "slof", "dao", "iforest", "lof", "clip", "xmodal", "xgroup")
_KNN_DETECTORS = frozenset({"kdist", "lid", "slof", "dao"})
#: the detectors that read a pair's image and caption embeddings apart (`score_and_report`'s ``image_text``)
PAIR_DETECTORS = frozenset({"clip", "xmodal", "xgroup"})
#: xgroup's default: captions at least this close (cosine) count as saying the same thing
SAME_CAPTION = 0.95

Variant = Literal["exact", "reference"]
#: ``exact``: the formulas above on exact global neighbours; ``reference``: the published code's (see module doc).
VARIANTS: tuple[str, ...] = ("exact", "reference")
DaoForm = Literal["log", "power"]
DAO_FORMS: tuple[str, ...] = ("log", "power")

DEFAULT_EPS = 1e-12
#: the constants of the reference code: 1e-4 added to distance ratios in its LID, its nan_to_num values
REFERENCE_EPS = 1e-4
REFERENCE_NAN = 1000.0


# ---------------------------------------------------------------------------
# scores from kNN lists
# ---------------------------------------------------------------------------


def kdist_score(distances: Tensor) -> Tensor:
    """k-distance ``a_k(x)``: the last column of a sorted ``[N, k]`` kNN list."""
    return distances[:, -1].clone()


def lid_score(distances: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Maximum-likelihood LID estimate ``-k / sum_i log(a_i / a_k)`` (see module doc)."""
    k = distances.shape[1]
    d = distances + eps
    log_ratio_sum = torch.log(d / d[:, -1:]).sum(dim=1)
    return k / (-log_ratio_sum).clamp_min(eps)


def slof_score(
    distances: Tensor,
    indices: Tensor,
    ref_distances: Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Simplified LOF: mean of ``a_k(x) / a_k(x_j)`` over the neighbours ``x_j``.

    ``ref_distances`` are the kNN distances of the reference points among
    themselves (``None``: the queries are the reference set).
    """
    ref = distances if ref_distances is None else ref_distances
    kd_ref = ref[:, -1] + eps
    kd = distances[:, -1:] + eps
    return (kd / kd_ref[indices]).mean(dim=1)


def dao_score(
    distances: Tensor,
    indices: Tensor,
    ref_distances: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    ref_lid: Tensor | None = None,
    form: DaoForm = "log",
) -> Tensor:
    """Dimensionality-Aware Outlier score: ``mean_j LID(x_j) log(a_k(x) / a_k(x_j))`` (``form="log"``), or
    ``log mean_j (a_k(x) / a_k(x_j)) ** LID(x_j)`` (``form="power"``, the DAO paper's score in log scale).

    ``ref_distances`` as in :func:`slof_score`; ``ref_lid`` may pass
    precomputed LIDs of the reference points.
    """
    if form not in DAO_FORMS:
        raise ValueError(f"unknown DAO form {form!r}; choose from {DAO_FORMS}")
    ref = distances if ref_distances is None else ref_distances
    lid_ref = lid_score(ref, eps) if ref_lid is None else ref_lid
    kd_ref = ref[:, -1] + eps
    kd = distances[:, -1:] + eps
    terms = lid_ref[indices] * torch.log(kd / kd_ref[indices])
    if form == "power":  # log of the mean of exp(terms), without forming exp(terms)
        return torch.logsumexp(terms, dim=1) - math.log(terms.shape[1])
    return terms.mean(dim=1)


def reference_code_scores(distances: Tensor, indices: Tensor, ref_distances: Tensor | None, own: Tensor,
                          names: Sequence[str], dao_form: DaoForm = "log") -> dict[str, Tensor]:
    """k-distance, LID, SLOF and DAO as the published reference code computes them (``variant="reference"``).

    From ``backdoor_sample_detector/{k_distance,lid_detection,slof,dao}.py`` of
    HanxunH/Detect-CLIP-Backdoor-Samples, for one batch holding the queries and references:

    * it drops each query's own column from the distance matrix and sorts the rest, then uses the position
      ``p`` in that row as a reference row: a neighbour stored after the query's own row is read one row too
      early (``p = j - 1`` for ``j > own``);
    * the query's distance is ``a[:, k]`` of that row, its ``(k+1)``-th neighbour; a neighbour's is column
      ``k`` of its full sorted row, self (0) included: its ``k``-th;
    * LID is ``-k / sum_{c<k} log(a_c / a_k + 1e-4)``; a neighbour's sum starts with its own distance 0
      (``log 1e-4``);
    * DAO is ``mean_p LID(p) * log(a_{k+1}(x) / a_k(p))``; ``dao_form="power"`` gives its commented-out
      ``mean_p (a_{k+1}(x) / a_k(p)) ** LID(p)``;
    * NaN and +inf become 1000, -inf 0 (its ``nan_to_num``; applied to LID too, so ranks are defined).

    Ties are in index order, where its ``torch.sort`` leaves them unspecified, and the distances are the
    exact ones of `knn` rather than ``torch.cdist``'s.

    Args:
        distances, indices: each query's ``k + 1`` nearest references (own row excluded), ``[N, k + 1]``.
        ref_distances: the references' ``k`` nearest among themselves (own row excluded), ``[M, k]``; only
            SLOF and DAO read it.
        own: each query's own row in the references, or -1 (``[N]``).
        names: which of ``kdist``, ``lid``, ``slof``, ``dao`` to return.
        dao_form: ``log`` (the code's) or ``power``.
    """
    k = distances.shape[1] - 1
    a_next = distances[:, k]

    def tidy(t: Tensor) -> Tensor:
        return torch.nan_to_num(t, nan=REFERENCE_NAN, posinf=REFERENCE_NAN, neginf=0.0)

    def lid(rows: Tensor) -> Tensor:  # rows: sorted [n, k + 1] distances, column k the divisor
        return -k / torch.log(rows[:, :k] / rows[:, k:] + REFERENCE_EPS).sum(dim=1)

    out: dict[str, Tensor] = {"kdist": a_next.clone(), "lid": tidy(lid(distances))}
    if {"slof", "dao"} & set(names):
        assert ref_distances is not None
        pos = indices[:, :k] - ((own.unsqueeze(1) >= 0) & (indices[:, :k] > own.unsqueeze(1))).long()
        full = torch.cat([torch.zeros_like(ref_distances[:, :1]), ref_distances], dim=1)  # self at distance 0
        ratio = a_next.unsqueeze(1) / full[pos, k]
        out["slof"] = tidy(ratio.mean(dim=1))
        lid_ref = lid(full)[pos]
        terms = torch.pow(ratio, lid_ref) if dao_form == "power" else lid_ref * torch.log(ratio)
        out["dao"] = tidy(terms.mean(dim=1))
    return {name: out[name] for name in names}


# ---------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def isolation_forest_score(
    embeddings: Tensor | np.ndarray,
    n_estimators: int = 100,
    seed: int = 0,
    **kwargs: object,
) -> Tensor:
    """Isolation Forest anomaly score (negated ``score_samples``), fit on ``embeddings``."""
    from sklearn.ensemble import IsolationForest

    x = _to_numpy(embeddings)
    model = IsolationForest(n_estimators=n_estimators, random_state=seed, **kwargs)  # type: ignore[arg-type]
    model.fit(x)
    return torch.from_numpy(-model.score_samples(x).astype(np.float32))


def lof_score(
    embeddings: Tensor | np.ndarray,
    k: int = 16,
    metric: Metric = "euclidean",
    **kwargs: object,
) -> Tensor:
    """Local Outlier Factor of each training point (``-negative_outlier_factor_``)."""
    from sklearn.neighbors import LocalOutlierFactor

    x = _to_numpy(embeddings)
    model = LocalOutlierFactor(n_neighbors=k, metric=metric, **kwargs)  # type: ignore[arg-type]
    model.fit(x)
    return torch.from_numpy(-model.negative_outlier_factor_.astype(np.float32))


def clip_score(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """Negated cosine similarity of paired image/text embeddings (low alignment = anomalous)."""
    return -torch.nn.functional.cosine_similarity(
        float_matrix(image_embeddings), float_matrix(text_embeddings), dim=1
    )


def neighbour_cosines(x: Tensor, neighbours: Tensor, ref: Tensor | None = None, chunk_size: int = 4096) -> Tensor:
    """``[N, k]``: ``cos(x_i, r_j)`` for the rows ``j`` of ``neighbours[i]`` (indices into ``ref``, default ``x``).
    Chunked: ``[N, k, D]`` at once would not fit for a million pairs."""
    t = torch.nn.functional.normalize(float_matrix(x), dim=1)
    r = t if ref is None else torch.nn.functional.normalize(float_matrix(ref), dim=1)
    out = torch.empty(neighbours.shape, dtype=t.dtype, device=t.device)
    for s in range(0, len(t), chunk_size):
        out[s:s + chunk_size] = (t[s:s + chunk_size].unsqueeze(1) * r[neighbours[s:s + chunk_size]]).sum(-1)
    return out


def caption_disagreement(text: Tensor, neighbours: Tensor, ref_text: Tensor | None = None,
                         chunk_size: int = 4096) -> Tensor:
    """``-mean_j cos(t_i, r_j)`` over the rows ``j`` of ``neighbours[i]`` (indices into ``ref_text``, default
    ``text``): how unlike each caption is to its neighbours' captions."""
    return -neighbour_cosines(text, neighbours, ref_text, chunk_size).mean(1)


def xmodal_score(image: Tensor, text: Tensor, k: int = 16, *, chunk_size: int = 1024, seed: int = 0,
                 reference_size: int | None = None, reference_draws: int = 1,
                 search: NeighbourSearch | None = None) -> Tensor | None:
    """Cross-modal disagreement (module doc): each pair's caption against the captions of its image's ``k``
    nearest images, among the whole set or, with ``reference_size``, in each of ``reference_draws`` random
    subsamples (the same draws as `score_samples` with the same ``seed``), averaged. Against the whole set
    poisons that share a trigger are each other's nearest images and share the caption too (blended images
    are); a subsample leaves few of them. None on a process of ``search`` that only lent its share."""
    n = image.shape[0]
    opts = dict(k=k, chunk_size=chunk_size)
    if reference_size is not None:
        check_reference_size(k, reference_size, reference_draws, n)
    if reference_size is None:
        found = (search or knn)(image, None, **opts)
        return None if found is None else caption_disagreement(text, found[1])
    total: Tensor | None = None
    for rows, own in _reference_draws(n, reference_size, reference_draws, seed, image.device):
        found = (search or knn)(image, image[rows], self_index=own, **opts)
        if found is None:
            continue
        score = caption_disagreement(text, found[1], text[rows]) / reference_draws
        total = score if total is None else total + score
    return total


def caption_group_mean(scores: Tensor | None, text: Tensor, k: int = 16, *, same_caption: float = SAME_CAPTION,
                       chunk_size: int = 1024, seed: int = 0, reference_size: int | None = None,
                       reference_draws: int = 1, search: NeighbourSearch | None = None) -> Tensor | None:
    """Each pair's ``scores`` averaged with those of the pairs whose captions say the same thing: cosine at least
    ``same_caption`` among its caption's ``k`` nearest captions in the whole set or, with ``reference_size``, in
    each of the same random subsamples as `score_samples` (all draws pooled: ``(s_i + sum s_j) / (1 + count)``).
    ``scores`` is None on a process of ``search`` that only lends its share (it then returns None too)."""
    check_same_caption(same_caption)
    text = torch.nn.functional.normalize(float_matrix(text), dim=1)  # nearest in cosine
    n = text.shape[0]
    opts = dict(k=k, chunk_size=chunk_size)
    if reference_size is not None:
        check_reference_size(k, reference_size, reference_draws, n)
        draws = list(_reference_draws(n, reference_size, reference_draws, seed, text.device))
    else:
        draws = [(None, None)]
    total = count = None
    for rows, own in draws:
        refs = None if rows is None else text[rows]
        found = (search or knn)(text, refs, self_index=own, **opts)
        if found is None or scores is None:
            continue
        same = (neighbour_cosines(text, found[1], refs) >= same_caption).to(scores.dtype)
        pool = scores if rows is None else scores[rows]
        part, many = (same * pool[found[1]]).sum(1), same.sum(1)
        total, count = (part, many) if total is None else (total + part, count + many)
    if scores is None or total is None:
        return None
    return (scores + total) / (1 + count)


def check_same_caption(same_caption: float) -> None:
    """xgroup's threshold is a cosine (ValueError otherwise): checked before an embedding pass, not after."""
    if not -1.0 <= same_caption <= 1.0:
        raise ValueError(f"same_caption is a cosine in [-1, 1] (got {same_caption})")


def _reference_draws(n: int, reference_size: int, reference_draws: int, seed: int, device: torch.device):
    """The random subsamples the scores are averaged over: each draw's rows, and each point's row in it (-1)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(reference_draws):
        rows = torch.randperm(n, generator=g)[:reference_size].to(device)
        own = torch.full((n,), -1, dtype=torch.int64, device=device)
        own[rows] = torch.arange(reference_size, device=device)
        yield rows, own


# ---------------------------------------------------------------------------
# convenience
# ---------------------------------------------------------------------------


def score_samples(
    embeddings: Tensor,
    detectors: Sequence[str] = ("kdist", "lid", "slof", "dao"),
    k: int = 16,
    *,
    references: Tensor | None = None,
    chunk_size: int = 1024,
    ref_chunk_size: int | None = None,
    metric: Metric = "euclidean",
    eps: float = DEFAULT_EPS,
    text_embeddings: Tensor | None = None,
    seed: int = 0,
    reference_size: int | None = None,
    reference_draws: int = 1,
    variant: Variant = "exact",
    dao_form: DaoForm = "log",
    search: NeighbourSearch | None = None,
    same_caption: float = SAME_CAPTION,
    image_embeddings: Tensor | None = None,
) -> dict[str, Tensor]:
    """Score every row of ``embeddings`` with several detectors (higher = more anomalous).

    The kNN search runs once and is shared by all kNN detectors. With
    ``references`` given, ``embeddings`` are scored against that set (a second
    search gives the references' own neighbourhoods for SLOF/DAO); otherwise
    each point is scored against all the others.

    ``reference_size``: score every point against ``reference_draws`` random
    subsamples of ``reference_size`` points of the set (each exact, each
    point's own row excluded) and average the scores. Poisons that share a
    trigger and a caption are each other's nearest neighbours and mask each
    other once there are more of them than ``k``; in a subsample few of them
    remain (subsampled outlier ensembles, Zimek et al., KDD 2013; the
    reference code's per-batch search does this by accident).

    ``variant="reference"`` computes the kNN detectors as the published code
    does (`reference_code_scores`), ``dao_form`` picks DAO's log or power form
    (module doc). ``search`` replaces the one-process `knn` for the queries'
    lists, e.g. a `lit_amdet.neighbours.ShardedSearch` that spreads it over
    processes: every process calls this with the same arguments, and the ones
    that are not its root only lend their share and get ``{}``.

    ``"iforest"`` and ``"lof"`` run scikit-learn on CPU (fit on ``embeddings``);
    ``"clip"``, ``"xmodal"`` and ``"xgroup"`` need ``text_embeddings`` and read ``image_embeddings`` (default:
    ``embeddings``, e.g. when the kNN detectors see image and text together); ``same_caption`` is xgroup's
    (`caption_group_mean`). Under a ``search`` xmodal's and xgroup's searches are spread over the processes too.
    Results are on ``embeddings.device``.
    """
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; choose from {DETECTORS}")
    if variant not in VARIANTS or dao_form not in DAO_FORMS:
        raise ValueError(f"variant must be one of {VARIANTS} and dao_form one of {DAO_FORMS} "
                         f"(got {variant!r}, {dao_form!r})")
    paired = [d for d in detectors if d in PAIR_DETECTORS]
    if paired and text_embeddings is None:
        raise ValueError(f"the {paired[0]!r} detector needs text_embeddings")
    image = embeddings if image_embeddings is None else image_embeddings
    out: dict[str, Tensor] = {}
    knn_names = [d for d in detectors if d in _KNN_DETECTORS]
    n = embeddings.shape[0]
    if knn_names:
        opts = dict(k=k, chunk_size=chunk_size, ref_chunk_size=ref_chunk_size, metric=metric)
        how = dict(names=knn_names, opts=opts, eps=eps, variant=variant, dao_form=dao_form, search=search)
        if reference_size is None:
            available = n - 1 if references is None else references.shape[0]
            if variant == "reference" and k + 1 > available:
                raise ValueError(f"variant 'reference' reads each sample's (k+1)-th neighbour: k={k} needs "
                                 f"more than {available} references")
            out.update(_knn_scores(embeddings, references, None, **how))
        else:
            if references is not None:
                raise ValueError("reference_size subsamples the set itself; it does not go with references")
            check_reference_size(k, reference_size, reference_draws, n, variant)
            for rows, own in _reference_draws(n, reference_size, reference_draws, seed, embeddings.device):
                draw = _knn_scores(embeddings, embeddings[rows], own, **how)
                for name, score in draw.items():
                    out[name] = out[name] + score / reference_draws if name in out else score / reference_draws
    if {"xmodal", "xgroup"} & set(detectors):  # on every process: their searches are spread over the processes too
        opts = dict(chunk_size=chunk_size, seed=seed, reference_size=reference_size,
                    reference_draws=reference_draws, search=search)
        out["xmodal"] = xmodal_score(image, text_embeddings, k, **opts)
        if "xgroup" in detectors:  # xmodal is None on a helper process, which then only lends its searches
            out["xgroup"] = caption_group_mean(out["xmodal"], text_embeddings, k, same_caption=same_caption, **opts)
    if search is not None and not search.is_root:
        return {}
    device = embeddings.device
    if "iforest" in detectors:
        out["iforest"] = isolation_forest_score(embeddings, seed=seed).to(device)
    if "lof" in detectors:
        out["lof"] = lof_score(embeddings, k=k, metric=metric).to(device)
    if "clip" in detectors:
        out["clip"] = clip_score(image, text_embeddings)
    return {name: out[name] for name in detectors}


def check_reference_size(k: int, reference_size: int, reference_draws: int, n: int,
                         variant: Variant = "exact") -> None:
    """A subsample must hold more than ``k`` of the ``n`` points (``k + 1`` for the reference variant, which
    reads the (k+1)-th neighbour), and be drawn at least once (ValueError)."""
    need = k + 1 if variant == "reference" else k
    if not need < reference_size <= n or reference_draws < 1:
        raise ValueError(f"reference_size must be in ({need}, {n}] (more than {'k + 1' if need > k else 'k'}, at "
                         f"most the {n} samples) and reference_draws >= 1 (got {reference_size}, {reference_draws})")


def _knn_scores(x: Tensor, references: Tensor | None, self_index: Tensor | None, *, names: Sequence[str],
                opts: dict, eps: float, variant: Variant, dao_form: DaoForm,
                search: NeighbourSearch | None) -> dict[str, Tensor]:
    """The kNN detectors of ``x`` against ``references`` (None: ``x`` itself, self excluded); ``{}`` on a
    process of ``search`` that only lent its share."""
    k = opts["k"]
    reference = variant == "reference"
    found = (search or knn)(x, references, self_index=self_index, **{**opts, "k": k + 1 if reference else k})
    if found is None:
        return {}
    dist, idx = found
    separate = references is not None and references is not x
    ref_dist = None
    if separate and {"slof", "dao"} & set(names):  # a small reference set: its own lists here, in one process
        ref_dist, _ = knn(references, None, **opts)
    if reference:
        if self_index is not None:
            own = self_index
        else:  # the whole set: each query's own row is itself; a separate set holds none of them
            own = torch.full_like(idx[:, 0], -1) if separate else torch.arange(len(x), device=idx.device)
        return reference_code_scores(dist, idx, ref_dist if separate else dist[:, :k], own, names, dao_form)
    scores = {"kdist": lambda: kdist_score(dist), "lid": lambda: lid_score(dist, eps),
              "slof": lambda: slof_score(dist, idx, ref_dist, eps),
              "dao": lambda: dao_score(dist, idx, ref_dist, eps, form=dao_form)}
    return {name: scores[name]() for name in names}
