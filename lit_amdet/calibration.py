"""Fitting a calibrated rule: the logistic regression `lit-amdet benchmark` fits on its calibration zoo's raw scores
and writes as the ``calibration.json`` that `lit_amdet.decision.CalibratedRule` reads."""

from __future__ import annotations

from typing import Sequence

from lit_amdet.decision import score_feature
from lit_amdet.errors import ConfigError


def feature_values(row: dict, features: Sequence[str]) -> list[float]:
    """A member's calibrated-rule inputs (``row``: {"scores", "name"}); a missing score is a `ConfigError`
    naming it."""
    values = [score_feature(row["scores"], f) for f in features]
    missing = [f for f, v in zip(features, values) if v is None]
    if missing:
        raise ConfigError(f"{row.get('name', 'a member')}: its scan has no {missing[0]} (scanned without an anchor, "
                          "or without the typed-token probe?)")
    return values


def fit_calibration(rows: Sequence[dict], features: Sequence[str], rule: dict | None = None,
                    c: float = 1.0) -> dict:
    """Logistic regression of "backdoored" on the scan's raw scores (``rows``: {"backdoored", "scores"}).

    Features are standardised for the fit (inverse regularisation strength ``c``) and the scaling is folded
    back into the coefficients, so the JSON applies to raw scores. The threshold maximises F1 on the same rows
    (ties: the one nearest 0.5). ``rule`` carries the per-prompt thresholds the scans counted ratios with.
    The result is what `CalibratedRule` reads from ``calibration.json``.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    labels = [bool(r["backdoored"]) for r in rows]
    if len(set(labels)) < 2:
        raise ConfigError(f"calibration needs backdoored and benign members; got {sum(labels)} backdoored and "
                          f"{len(labels) - sum(labels)} benign")
    x = np.array([feature_values(r, features) for r in rows], dtype=np.float64)
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0  # a constant feature carries no information; keep its coefficient finite
    model = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / std, labels)
    coefficients = model.coef_[0] / std
    intercept = float(model.intercept_[0] - (model.coef_[0] * mean / std).sum())
    probs = 1 / (1 + np.exp(-(x @ coefficients + intercept)))
    return {"model": "logistic_regression", "features": list(features),
            "coefficients": [float(v) for v in coefficients], "intercept": intercept,
            "threshold": choose_threshold(labels, probs.tolist()), **(rule or {}),
            "fitted_on": {"members": len(rows), "backdoored": sum(labels), "benign": len(labels) - sum(labels)}}


def choose_threshold(labels: Sequence[bool], probs: Sequence[float]) -> float:
    """The probability threshold (predict p > t) with the best F1; ties go to the one nearest 0.5."""
    values = sorted(set(probs))
    candidates = [0.5] + [(a + b) / 2 for a, b in zip(values, values[1:])]

    def f1(t: float) -> float:
        tp = sum(p > t and y for p, y in zip(probs, labels))
        fp = sum(p > t and not y for p, y in zip(probs, labels))
        fn = sum(p <= t and y for p, y in zip(probs, labels))
        return 2 * tp / max(1, 2 * tp + fp + fn)

    return max(candidates, key=lambda t: (f1(t), -abs(t - 0.5)))
