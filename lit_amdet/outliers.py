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
* DAO: ``mean_{j in kNN(x)} LID(x_j) * log((a_k(x) + eps) / (a_k(x_j) + eps))``.

Unlike the reference code (which works per mini-batch, and whose neighbour
indices were shifted by one row after dropping the self column, while mixing
``a_k`` and ``a_{k+1}``), neighbours here are exact and global over the whole
set, computed by :func:`knn` with chunked matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DETECTORS",
    "check_reference_size",
    "clip_score",
    "dao_score",
    "isolation_forest_score",
    "kdist_score",
    "knn",
    "lid_score",
    "lof_score",
    "score_samples",
    "slof_score",
]

Metric = Literal["euclidean", "cosine"]

#: Detector names understood by :func:`score_samples`.
DETECTORS: tuple[str, ...] = ("kdist", "lid", "slof", "dao", "iforest", "lof", "clip")
_KNN_DETECTORS = frozenset({"kdist", "lid", "slof", "dao"})

DEFAULT_EPS = 1e-12


# ---------------------------------------------------------------------------
# exact chunked k-nearest neighbours
# ---------------------------------------------------------------------------


def _smallest_k(d: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise ``k`` smallest values of ``d`` with ties broken by lowest column.

    Returns ``(values, columns)`` ordered by ``(value, column)``. ``torch.topk``
    alone breaks ties arbitrarily, which would make the selected neighbour set
    (and thus SLOF/DAO) depend on hardware; rows whose ``k``-th value is tied
    are re-selected explicitly.
    """
    vals, cols = torch.topk(d, k, dim=1, largest=False, sorted=True)
    kth = vals[:, -1:]
    tied = (d <= kth).sum(dim=1) > k
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        dt, kt = d[rows], kth[rows]
        # Key: strictly-smaller entries first (-1), then tied ones by column,
        # everything else last; the k smallest keys are the canonical choice.
        pos = torch.arange(d.shape[1], device=d.device, dtype=torch.int64)
        key = torch.where(dt == kt, pos, torch.iinfo(torch.int64).max)
        key = torch.where(dt < kt, -1, key)
        sel = torch.topk(key, k, dim=1, largest=False).indices
        vals[rows] = dt.gather(1, sel)
        cols[rows] = sel
    return _sort_by_value_then_index(vals, cols)


def _sort_by_value_then_index(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    order = idx.argsort(dim=1)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = vals.argsort(dim=1, stable=True)
    return vals.gather(1, order), idx.gather(1, order)


def _as_float(x: Tensor) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    # Half precision loses too much in ||q||^2 + ||r||^2 - 2 q.r.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def knn(
    queries: Tensor,
    references: Tensor | None = None,
    k: int = 16,
    chunk_size: int = 1024,
    metric: Metric = "euclidean",
    exclude_self: bool = True,
    ref_chunk_size: int | None = None,
    self_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k-nearest neighbours by chunked matrix products.

    Args:
        queries: ``[N, D]`` points whose neighbours are searched.
        references: ``[M, D]`` reference set; ``None`` (or ``queries`` itself)
            means the queries are the reference set.
        k: number of neighbours.
        chunk_size: number of query rows processed at once.
        metric: ``"euclidean"`` (L2 distance) or ``"cosine"`` (``1 - cos``).
        exclude_self: when the queries are the reference set, drop each point
            from its own neighbour list. Exclusion is by index identity, so
            exact duplicates of *other* points remain neighbours at distance 0.
            Ignored when a distinct ``references`` set is given.
        ref_chunk_size: number of reference rows scored at once (``None``:
            enough for a block of about 64 M distances, 256 MB in float32);
            partial top-k lists are merged across reference chunks.
        self_index: with a separate ``references`` set that holds some of
            the queries: for each query, its own row in ``references``, or -1
            (``[N]`` integers). Those rows are excluded as in a self-search:
            a shard of the set searched against all of it, or the set scored
            against a subsample of itself.

    Returns:
        ``(distances [N, k], indices [N, k])`` sorted by increasing distance,
        ties broken by lowest reference index. Distances of the selected
        neighbours are recomputed from coordinate differences, so exact
        duplicates come out at exactly 0 (the ``||q||^2 + ||r||^2 - 2 q.r``
        expansion used for the search cancels badly there).

    Peak extra memory is about ``chunk_size * R * (itemsize + 1)`` bytes with
    ``R`` the reference chunk, plus up to ``8 + itemsize`` bytes per element
    for rows with ties at the k-th distance, plus an ``[M, D]`` normalised copy
    for the cosine metric. Runs on whatever device the inputs live on.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"unknown metric {metric!r}")
    if chunk_size < 1 or (ref_chunk_size is not None and ref_chunk_size < 1):
        raise ValueError("chunk sizes must be positive")
    q_all = _as_float(queries)
    self_mode = references is None or references is queries
    r_all = q_all if self_mode else _as_float(references)  # type: ignore[arg-type]
    if r_all.shape[1] != q_all.shape[1]:
        raise ValueError("queries and references must have the same dimension")
    if r_all.dtype != q_all.dtype:
        r_all = r_all.to(q_all.dtype)
    n_q, n_r = q_all.shape[0], r_all.shape[0]
    if self_index is not None:
        if self_mode:
            raise ValueError("self_index goes with a separate references set")
        self_index = self_index.to(device=q_all.device, dtype=torch.int64)
        if self_index.shape != (n_q,) or bool((self_index >= n_r).any()) or bool((self_index < -1).any()):
            raise ValueError(f"self_index must hold one reference row (or -1) for each of the {n_q} queries")
    skip_self = self_mode and exclude_self
    available = n_r - 1 if skip_self or (self_index is not None and bool((self_index >= 0).any())) else n_r
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be in [1, {available}] for {n_r} reference points")

    if metric == "cosine":
        q_all = torch.nn.functional.normalize(q_all, dim=1)
        r_all = q_all if self_mode else torch.nn.functional.normalize(r_all, dim=1)
        r_sq = None
    else:
        r_sq = r_all.pow(2).sum(dim=1)
    # Blocks of ~64 M distances: big enough for full-speed matrix products, small enough to bound memory.
    r_step = ref_chunk_size if ref_chunk_size is not None else max(k, 2**26 // min(chunk_size, n_q))

    out_d = torch.empty(n_q, k, dtype=q_all.dtype, device=q_all.device)
    out_i = torch.empty(n_q, k, dtype=torch.int64, device=q_all.device)
    for qs in range(0, n_q, chunk_size):
        qe = min(qs + chunk_size, n_q)
        q = q_all[qs:qe]
        q_sq = q.pow(2).sum(dim=1, keepdim=True) if r_sq is not None else None
        best_d: Tensor | None = None
        best_i: Tensor | None = None
        for rs in range(0, n_r, r_step):
            re_ = min(rs + r_step, n_r)
            r = r_all[rs:re_]
            if r_sq is not None and q_sq is not None:
                # Squared L2 (monotone in L2, so enough for selection).
                d = torch.addmm(r_sq[rs:re_].unsqueeze(0), q, r.T, alpha=-2.0)
                d.add_(q_sq).clamp_(min=0.0)
            else:
                d = torch.mm(q, r.T).neg_().add_(1.0).clamp_(0.0, 2.0)
            if skip_self:
                lo, hi = max(qs, rs), min(qe, re_)
                if lo < hi:
                    g = torch.arange(lo, hi, device=d.device)
                    d[g - qs, g - rs] = float("inf")
            elif self_index is not None:
                own = self_index[qs:qe]
                rows = ((own >= rs) & (own < re_)).nonzero().squeeze(1)
                d[rows, own[rows] - rs] = float("inf")
            kk = min(k, re_ - rs)
            cd, ci = _smallest_k(d, kk)
            ci = ci + rs
            del d
            if best_d is None or best_i is None:
                best_d, best_i = cd, ci
            else:
                # Earlier chunks hold lower indices, so column order in the
                # concatenation preserves the lowest-index tie-break.
                merged = torch.cat([best_d, cd], dim=1)
                md, mc = _smallest_k(merged, min(k, merged.shape[1]))
                best_i = torch.cat([best_i, ci], dim=1).gather(1, mc)
                best_d = md
        assert best_i is not None
        # Accurate distances for the k selected neighbours only.
        diff = q.unsqueeze(1) - r_all[best_i]
        exact = diff.pow(2).sum(dim=-1)
        exact = exact.sqrt() if metric == "euclidean" else exact.mul_(0.5)
        out_d[qs:qe], out_i[qs:qe] = _sort_by_value_then_index(exact, best_i)
    return out_d, out_i


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
) -> Tensor:
    """Dimensionality-Aware Outlier score: ``mean_j LID(x_j) log(a_k(x) / a_k(x_j))``.

    ``ref_distances`` as in :func:`slof_score`; ``ref_lid`` may pass
    precomputed LIDs of the reference points.
    """
    ref = distances if ref_distances is None else ref_distances
    lid_ref = lid_score(ref, eps) if ref_lid is None else ref_lid
    kd_ref = ref[:, -1] + eps
    kd = distances[:, -1:] + eps
    return (lid_ref[indices] * torch.log(kd / kd_ref[indices])).mean(dim=1)


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
        _as_float(image_embeddings), _as_float(text_embeddings), dim=1
    )


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

    ``"iforest"`` and ``"lof"`` run scikit-learn on CPU (fit on ``embeddings``);
    ``"clip"`` needs ``text_embeddings``. Results are on ``embeddings.device``.
    """
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; choose from {DETECTORS}")
    out: dict[str, Tensor] = {}
    knn_names = [d for d in detectors if d in _KNN_DETECTORS]
    if knn_names:
        opts = dict(k=k, chunk_size=chunk_size, ref_chunk_size=ref_chunk_size, metric=metric)
        if reference_size is None:
            out.update(_knn_scores(embeddings, references, None, knn_names, opts, eps))
        else:
            if references is not None:
                raise ValueError("reference_size subsamples the set itself; it does not go with references")
            n = embeddings.shape[0]
            check_reference_size(k, reference_size, reference_draws, n)
            g = torch.Generator().manual_seed(seed)
            for _ in range(reference_draws):
                rows = torch.randperm(n, generator=g)[:reference_size].to(embeddings.device)
                own = torch.full((n,), -1, dtype=torch.int64, device=embeddings.device)
                own[rows] = torch.arange(reference_size, device=embeddings.device)
                draw = _knn_scores(embeddings, embeddings[rows], own, knn_names, opts, eps)
                for name, score in draw.items():
                    out[name] = out[name] + score / reference_draws if name in out else score / reference_draws
    device = embeddings.device
    if "iforest" in detectors:
        out["iforest"] = isolation_forest_score(embeddings, seed=seed).to(device)
    if "lof" in detectors:
        out["lof"] = lof_score(embeddings, k=k, metric=metric).to(device)
    if "clip" in detectors:
        if text_embeddings is None:
            raise ValueError("the 'clip' detector needs text_embeddings")
        out["clip"] = clip_score(embeddings, text_embeddings)
    return {name: out[name] for name in detectors}


def check_reference_size(k: int, reference_size: int, reference_draws: int, n: int) -> None:
    """A subsample must hold more than ``k`` of the ``n`` points, and be drawn at least once (ValueError)."""
    if not k < reference_size <= n or reference_draws < 1:
        raise ValueError(f"reference_size must be in ({k}, {n}] (more than k, at most the {n} samples) and "
                         f"reference_draws >= 1 (got {reference_size}, {reference_draws})")


def _knn_scores(x: Tensor, references: Tensor | None, self_index: Tensor | None, names: Sequence[str],
                opts: dict, eps: float) -> dict[str, Tensor]:
    """The kNN detectors of ``x`` against ``references`` (None: ``x`` itself, self excluded)."""
    dist, idx = knn(x, references, self_index=self_index, **opts)
    ref_dist = None
    if references is not None and references is not x and {"slof", "dao"} & set(names):
        ref_dist, _ = knn(references, None, **opts)
    scores = {"kdist": lambda: kdist_score(dist), "lid": lambda: lid_score(dist, eps),
              "slof": lambda: slof_score(dist, idx, ref_dist, eps), "dao": lambda: dao_score(dist, idx, ref_dist, eps)}
    return {name: scores[name]() for name in names}
