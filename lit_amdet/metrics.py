"""Every metric lit-amdet reports, in one place (torchmetrics underneath; plain values out).

- detection of backdoored *models* (the benchmark): `classification_metrics` of hard verdicts,
  `probability_metrics` of calibrated probabilities (AUROC, binary cross-entropy, Brier), `value_summary`;
- detection of poisoned *samples* (``scan-data``): `ranking_metrics` (ROC-AUC, PR-AUC, FPR at 95 % TPR),
  `ranks`, `budget_metrics` (poisons removed and clean pairs lost by a cut), and the rankings that combine
  detectors (`rank_union`, `rank_product`, and `combine` of an expression of them such as
  ``(dao+xgroup)+dao*xgroup``);
- retrieval (training and attack success): `recall_at_k`, `retrieves_first`.
"""

from __future__ import annotations

import re
import statistics
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def classification_metrics(truth: Sequence[bool], predicted: Sequence[bool]) -> dict:
    """Precision, recall and F1 of hard verdicts (torchmetrics; 0 where undefined, None without rows)."""
    from torchmetrics.functional.classification import binary_f1_score, binary_precision, binary_recall

    if not truth:
        return {"precision": None, "recall": None, "f1": None}
    t, p = torch.tensor(truth, dtype=torch.long), torch.tensor(predicted, dtype=torch.long)
    return {"precision": float(binary_precision(p, t)), "recall": float(binary_recall(p, t)),
            "f1": float(binary_f1_score(p, t))}


def probability_metrics(truth: Sequence[bool], probability: Sequence[float], threshold: float = 0.5) -> dict:
    """Precision/recall/F1 of ``p > threshold``, AUROC (None with one class), binary cross-entropy, Brier score."""
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.classification import binary_auroc

    out = classification_metrics(truth, [p > threshold for p in probability])
    if not truth:
        return {**out, "auroc": None, "bce": None, "brier": None}
    t = torch.tensor(truth, dtype=torch.float64)
    p = torch.tensor(probability, dtype=torch.float64)
    out["auroc"] = float(binary_auroc(p, t.long())) if 0 < t.sum() < len(t) else None
    out["bce"] = float(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), t))
    out["brier"] = float(mean_squared_error(p, t))
    return out


def auroc(scores: Sequence[float], truth: Sequence[bool]) -> float | None:
    """AUROC of raw scores (any scale) against the truth; None with one class."""
    from torchmetrics.functional.classification import binary_auroc

    if not 0 < sum(bool(t) for t in truth) < len(truth):
        return None
    return float(binary_auroc(torch.tensor(list(scores), dtype=torch.float64),
                              torch.tensor([bool(t) for t in truth], dtype=torch.long)))


def value_summary(values: Sequence[float | None]) -> dict | None:
    """n, min, median, max, mean and population std of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values), "std": statistics.pstdev(values)}


def ranking_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """ROC-AUC, PR-AUC (average precision) and FPR at 95 % TPR of anomaly scores; None when one class is missing."""
    from scipy.stats import rankdata
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

    if labels.all() or not labels.any():
        return {"auroc": None, "pr_auc": None, "fpr_at_95_tpr": None}
    # Average ranks scaled into (0, 1]: torchmetrics squashes scores outside [0, 1] with a sigmoid,
    # which would tie large scores (LID ~ 20+) at 1.0; ranks keep the order and the ties exactly.
    preds = torch.from_numpy(rankdata(scores) / len(scores))
    target = torch.from_numpy(labels.astype(np.int64))
    fpr, tpr, _ = binary_roc(preds, target)
    return {
        "auroc": float(binary_auroc(preds, target)),
        "pr_auc": float(binary_average_precision(preds, target)),
        "fpr_at_95_tpr": float(fpr[tpr >= 0.95].min()),
    }


def budget_metrics(flagged: np.ndarray, labels: np.ndarray) -> dict[str, int | float | None]:
    """What removing the ``flagged`` samples does when the poisons (``labels``) are known: how many poisons go
    (count and share of all poisons: the recall of the cut), how many clean pairs go with them (count and share
    of the clean pairs: what the cleaning costs), and the precision of the removed set. A share whose
    denominator is zero (no poisons, nothing clean, nothing flagged) is None, not a made-up 0 or 1."""
    flagged = np.asarray(flagged, dtype=bool)
    labels = np.asarray(labels, dtype=bool)
    if flagged.shape != labels.shape or flagged.ndim != 1:
        raise ValueError(f"flagged {flagged.shape} and labels {labels.shape} must be two equal-length vectors")
    poisons, clean, removed = int(labels.sum()), int((~labels).sum()), int(flagged.sum())
    hit = int((flagged & labels).sum())
    lost = removed - hit

    def share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    return {"flagged": removed, "poisons": poisons, "poisons_removed": hit,
            "poisons_removed_share": share(hit, poisons), "clean_lost": lost,
            "clean_lost_share": share(lost, clean), "precision": share(hit, removed)}


def ranks(scores: np.ndarray) -> np.ndarray:
    """1 = most anomalous; ties go to the lower index, so the ranking is reproducible."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    out = np.empty(len(scores), dtype=np.int64)
    out[order] = np.arange(1, len(scores) + 1)
    return out


def rank_union(*scores: np.ndarray) -> np.ndarray:
    """Several detectors' scores as one ranking that flags what any of them ranks high: samples ordered by their
    best rank under the detectors, ties by their second best (then by index, as `ranks` breaks them). Returned as
    a score (higher = more anomalous): ``-(best + (second - 1) / n)``. The top ``B`` of it holds every sample each
    detector ranks within about ``B / len(scores)`` (less where the lists overlap): a budget shared between
    detectors that each see poisons the other misses."""
    if not scores or any(s.shape != scores[0].shape for s in scores):
        raise ValueError("rank_union needs one or more score arrays of the same shape")
    each = np.sort(np.stack([ranks(s) for s in scores]), axis=0)  # [detectors, n], best rank first
    second = each[1] if len(scores) > 1 else np.ones_like(each[0])
    return -(each[0] + (second - 1) / len(scores[0])).astype(np.float64)


def rank_product(*scores: np.ndarray) -> np.ndarray:
    """Several detectors' scores as one ranking that flags what all of them rank fairly high: the geometric mean of
    the ranks (the rank product, Breitling et al., FEBS Letters 2004; Fisher's combination of the rank p-values
    r / n), returned as a score (higher = more anomalous): ``-mean(log rank)``. Where `rank_union` needs one
    detector to put a sample near the very top, this finds the sample two detectors both put moderately high (a
    clean outlier is high under one only), and loses the one only a single detector sees."""
    if not scores or any(s.shape != scores[0].shape for s in scores):
        raise ValueError("rank_product needs one or more score arrays of the same shape")
    return -np.log(np.stack([ranks(s) for s in scores]).astype(np.float64)).mean(axis=0)


_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|([+*()]))")


def _parse(expr: str) -> tuple:
    """``expr`` as a tree: ``("name", n)``, ``("+", [...])`` or ``("*", [...])``; ``*`` binds tighter than ``+``
    and parentheses group (ValueError on anything else)."""
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read {expr!r} at {expr[pos:]!r}: detector names joined by + and *, "
                             "grouped by parentheses")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    at = 0

    def operands(op: str, inner) -> tuple:
        nonlocal at
        parts = [inner()]
        while at < len(tokens) and tokens[at] == op:
            at += 1
            parts.append(inner())
        return parts[0] if len(parts) == 1 else (op, parts)

    def atom() -> tuple:
        nonlocal at
        token = tokens[at] if at < len(tokens) else None
        at += 1
        if token == "(":
            tree = operands("+", lambda: operands("*", atom))
            if at >= len(tokens) or tokens[at] != ")":
                raise ValueError(f"unbalanced parentheses in {expr!r}")
            at += 1
            return tree
        if token is None or token in "+*)":
            raise ValueError(f"a detector name is missing in {expr!r}")
        return ("name", token)

    tree = operands("+", lambda: operands("*", atom))
    if at != len(tokens):
        raise ValueError(f"cannot read {expr!r} after {' '.join(tokens[:at])!r}")
    return tree


def combined_names(expr: str) -> list[str]:
    """The detector names an expression of `combine` reads, in order, without repeats (ValueError if unreadable)."""
    def leaves(tree: tuple) -> list[str]:
        return [tree[1]] if tree[0] == "name" else [n for part in tree[1] for n in leaves(part)]
    return list(dict.fromkeys(leaves(_parse(expr))))


def combine(expr: str, scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """One ranking from an expression of detectors: ``a+b`` is their `rank_union` (any of them ranks it high; the
    budget is shared equally between the operands), ``a*b`` their `rank_product` (they all rank it fairly high),
    ``*`` before ``+``, parentheses group (a group is one operand of its union). ``(dao+xgroup)+dao*xgroup``: half
    the budget to what DAO or xgroup alone ranks near the top, half to what both rank fairly high."""
    def value(tree: tuple) -> np.ndarray:
        if tree[0] == "name":
            return scores[tree[1]]
        return (rank_union if tree[0] == "+" else rank_product)(*(value(part) for part in tree[1]))
    return value(_parse(expr))


def recall_at_k(queries: Tensor, keys: Tensor, ks: tuple[int, ...] = (1, 5), block: int = 100) -> dict[int, float]:
    """Recall@k of query i retrieving key i among ``block`` consecutive candidates (blocks of the set).

    The last incomplete block is dropped so every query competes with exactly
    ``block`` candidates (pass ``block=len(queries)`` for the whole set).
    """
    n = (queries.shape[0] // block) * block
    if n == 0:
        raise ValueError(f"need at least {block} pairs for recall among {block}")
    q = F.normalize(queries[:n].float(), dim=-1).view(-1, block, queries.shape[-1])
    k = F.normalize(keys[:n].float(), dim=-1).view(-1, block, keys.shape[-1])
    sims = q @ k.transpose(1, 2)  # [blocks, block, block]
    true = sims.diagonal(dim1=1, dim2=2).unsqueeze(-1)
    rank = (sims > true).sum(-1)  # candidates strictly better than the true key
    return {kk: float((rank < kk).float().mean()) for kk in ks}


def retrieves_first(queries: Tensor, candidates: Tensor) -> Tensor:
    """Per query (``[N, D]``), 1.0 where the first of the unit ``candidates`` (``[C, D]``: a backdoor's target,
    then its distractors) is the nearest by cosine, else 0.0: the attack-success top-1 of `BackdoorInjection`."""
    return (F.normalize(queries.float(), dim=-1) @ candidates.T).argmax(1).eq(0).float()
