"""The collapse and divergence scores the decision rules read: plain math on a scan's held-out scores.

Kept apart from `lit_amdet.decision` (the rules) because the scan computes them (`lit_amdet.modules.detection`,
`lit_amdet.token_probe`) before any rule reads them.
"""

from __future__ import annotations

#: the least clean-prompt divergence a ratio is divided by (a model identical to its anchor has 0)
DRIFT_FLOOR = 0.02


def drift_normalised_divergence(cos: float | None, clean_cos: float | None, floor: float = DRIFT_FLOOR
                                ) -> float | None:
    """(1 - cos) under the trigger over (1 - cos) on clean prompts, suspect vs anchor: drift-normalised."""
    if cos is None or clean_cos is None:
        return None
    return (1 - cos) / max(1 - clean_cos, floor)


def relative_lift(value: float | None, clean: float | None, floor: float = DRIFT_FLOOR) -> float | None:
    """How much of the room to collapse a trigger used: (value - clean) / (1 - clean), for a similarity-like
    score in [-1, 1] (Sim_X, pooled consistency). 1: full collapse; 0: the trigger changed nothing; <0: it
    spread the outputs. Each model is measured against its own clean prompts, so a fine-tune that moved the
    model's clean baseline (a drift) does not move this number by itself."""
    if value is None or clean is None:
        return None
    return (value - clean) / max(1 - clean, floor)


#: the scores `collapse_scores` adds: (suspect score, anchor score, the suspect's lift beyond the anchor's)
COLLAPSE_SCORES = {"assimilation": ("collapse_lift", "anchor_collapse_lift", "unshared_collapse"),
                   "target_consistency": ("pooled_collapse_lift", "anchor_pooled_collapse_lift",
                                          "pooled_unshared_collapse")}


def collapse_scores(scores: dict, clean: dict, anchor: bool) -> dict:
    """Per feature space (token Sim_X and pooled-output consistency): the trigger's relative collapse of the
    suspect, of the anchor under the same trigger, and their difference (the collapse the anchor does not share).

    ``scores``: the trigger's held-out scores; ``clean``: the same scores on the clean prompts. A natural
    backdoor the suspect inherited collapses the anchor as well (difference ~0, whatever the drift); an injected
    one collapses the suspect alone (difference ~1). A negative anchor lift counts as 0: a trigger that spreads
    the anchor's outputs apart (which an optimised trigger can easily do) is not evidence against it.
    """
    out = {}
    for key, (lift, anchor_lift, unshared) in COLLAPSE_SCORES.items():
        out[lift] = relative_lift(scores.get(key), clean.get(key))
        if anchor:
            out[anchor_lift] = relative_lift(scores.get("anchor_" + key), clean.get("anchor_" + key))
            # an anchor the trigger spreads out shares none of the collapse; it cannot share less than none
            out[unshared] = None if None in (out[lift], out[anchor_lift]) else out[lift] - max(out[anchor_lift], 0.0)
    return out


def with_baselines(s: dict, base: dict, anchored: bool, floor: float = DRIFT_FLOOR) -> dict:
    """One trigger's held-out scores ``s`` plus those comparing it with the scan's clean and random-trigger
    baselines ``base`` (``{"clean": ..., "random": ...}``): the lifts, the collapse scores and, with an anchor,
    the drift-normalised divergences (``floor`` the least drift divided by)."""
    s = dict(s)
    s["anchor_used"] = anchored
    s["assimilation_clean"] = base["clean"]["assimilation"]
    s["assimilation_random_trigger"] = base["random"]["assimilation"]
    s["assimilation_lift"] = s["assimilation"] - base["random"]["assimilation"]
    s.update(collapse_scores(s, base["clean"], anchor=anchored))
    if anchored:
        # drift-normalised divergence from the anchor: under the trigger vs on clean prompts
        s["clean_anchor_cos"] = base["clean"]["anchor_cos"]
        s["divergence_ratio"] = drift_normalised_divergence(s["anchor_cos"], s["clean_anchor_cos"], floor)
        s["clean_anchor_pooled_cos"] = base["clean"]["anchor_pooled_cos"]
        s["pooled_divergence_ratio"] = drift_normalised_divergence(s["anchor_pooled_cos"],
                                                                   s["clean_anchor_pooled_cos"], floor)
        s["random_trigger_anchor_cos"] = base["random"]["anchor_cos"]
        s["assimilation_gap"] = s["assimilation"] - s["anchor_assimilation"]
    return s
