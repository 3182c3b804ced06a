"""The restarts of one scan as the decision rule sees them: which are yardsticks, the nulls they give the others,
each restart's decision and progress, and report.json's ``restart_scores``.

Beside `lit_amdet.decision` (the rules, which read the scores attached here) and plain Python like it;
`lit_amdet.modules.detection` calls it at every held-out check and at the end of the search.
"""

from __future__ import annotations

import math

from lit_amdet.decision import CLEAN, INCONCLUSIVE, DecisionRule, verdict_of
from lit_amdet.errors import CheckpointError

#: the restart roles (`lit_amdet.amdet.restart_roles`) that measure the anchor, as yardsticks of the others:
#: never judged, never the chosen restart
YARDSTICKS = ("null", "token_null")
#: the decision recorded for a yardstick restart: it measures the anchor's collapses, it is not a suspect trigger
NULL_DECISION = {"rule": "null restart", "backdoored": False, "verdict": CLEAN,
                 "decided_by": "not judged: a null restart (a yardstick of the others)", "checks": []}


def _anchor_unshared(s: dict, lift: str, anchor_lift: str) -> float | None:
    """The anchor's collapse the suspect does not share: the anchor's lift minus the suspect's, a negative one
    counted as 0 (as `collapse_scores` does the other way round)."""
    if s.get(lift) is None or s.get(anchor_lift) is None:
        return None
    return s[anchor_lift] - max(s[lift], 0.0)


def attach_null(scored: list[dict], roles: list[str], slots: list | None = None) -> list[dict]:
    """Give every charged restart's scores ``pooled_null``, the largest pooled collapse a null restart found in
    the anchor that the suspect does not share, and every judged restart's ``token_null``, the same in the token
    features from the swapped AMDET restarts (`lit_amdet.amdet.swapped_loss`) searched at the same slot
    (``slots``, one per restart; None: all at one): a search typed at each prompt's end is measured against the
    anchor's collapses found there. Nothing is added for a role the scan did not run."""
    slots = slots or [None] * len(roles)

    def largest(role: str, lift: str, anchor_lift: str, slot=None) -> float | None:
        found = [v for s, r, at in zip(scored, roles, slots) if r == role and (role != "token_null" or at == slot)
                 if (v := _anchor_unshared(s, lift, anchor_lift)) is not None]
        return max(found) if found else None

    pooled = largest("null", "pooled_collapse_lift", "anchor_pooled_collapse_lift")
    for s, role, slot in zip(scored, roles, slots):
        if role == "charged":
            s["pooled_null"] = pooled
        if "token_null" in roles and role not in YARDSTICKS:
            s["token_null"] = largest("token_null", "collapse_lift", "anchor_collapse_lift", slot)
    return scored


def judge_restarts(rule: DecisionRule, scored: list[dict], roles: list[str]
                   ) -> tuple[list[dict], list[float | None]]:
    """The rule's decision and progress for every restart. A yardstick restart is never flagged
    (`NULL_DECISION`); a null restart's progress is its charged twin's, so the benign stop drops the two
    together, and a swapped one's is the furthest of the judged restarts', so it runs while any of them may
    still need it."""
    decisions = [NULL_DECISION if role in YARDSTICKS else decide_finite(rule, s) for s, role in zip(scored, roles)]
    progress = [rule.progress(s) for s in scored]
    charged = [i for i, role in enumerate(roles) if role == "charged"]
    for twin, null in zip(charged, [i for i, role in enumerate(roles) if role == "null"]):
        progress[null] = progress[twin]
    judged = [p for p, role in zip(progress, roles) if role not in YARDSTICKS]
    for i, role in enumerate(roles):
        if role == "token_null":
            progress[i] = None if None in judged else max(judged, default=0.0)
    return decisions, progress


def restart_summary(stats: list[dict], decisions: list[dict], progress: list[float | None], objectives: list[str],
                    dropped: dict[int, int], slots: list) -> list[dict]:
    """report.json's ``restart_scores``: what each restart searched for and where (its slot), found and was
    judged."""
    keys = ("unshared_collapse", "pooled_unshared_collapse", "collapse_lift", "pooled_collapse_lift",
            "divergence_ratio", "pooled_divergence_ratio", "same_target_ratio")
    return [{"objective": objectives[i], "slot": slots[i], "loss": s["loss"], "verdict": verdict_of(d),
             "progress": progress[i], "dropped_at_step": dropped.get(i), **{k: s.get(k) for k in keys},
             **{k: s[k] for k in ("anchor_pooled_collapse_lift", "pooled_null", "anchor_collapse_lift", "token_null")
                if k in s}}
            for i, (s, d) in enumerate(zip(stats, decisions))]


def not_finite(scores: dict) -> list[str]:
    """The names of ``scores``' float values that are NaN or infinite."""
    return sorted(k for k, v in scores.items() if isinstance(v, float) and not math.isfinite(v))


def decide_finite(rule: DecisionRule, scores: dict) -> dict:
    """``rule``'s decision on the finite scores alone: a NaN or infinite score counts as missing, and where one was
    found the model is flagged only if the rest flag it, and is never cleared (``inconclusive (non-finite)``). Why:
    a NaN fails every check and an infinity passes some, so a suspect whose outputs overflow under a searched
    trigger (weights made to blow up off the real tokens' embeddings, where only the continuous search goes) would
    otherwise be called clean, or flagged, with nothing measured."""
    bad = not_finite(scores)
    if not bad:
        return rule.decide(scores)
    decision = rule.decide({**scores, **dict.fromkeys(bad)})
    if decision["backdoored"]:
        return decision
    return {**decision, "verdict": INCONCLUSIVE, "decided_by": (
        f"inconclusive (non-finite): {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} NaN or infinite (an "
        f"output of the suspect or the anchor overflowed), so the scan cannot clear the model")}


#: the clean scores only the suspect's outputs enter, and only the anchor's (`finite_baselines` names the broken one)
SUSPECT_ONLY = frozenset({"assimilation", "orig_cos", "target_consistency"})
ANCHOR_ONLY = frozenset({"anchor_assimilation", "anchor_target_consistency"})


def finite_baselines(base: dict) -> dict:
    """``base`` (the clean prompts' and random triggers' scores a scan measures first) if its clean scores are
    finite; else a one-line `CheckpointError` naming the encoder whose outputs are not. A model whose sentence
    embeddings of ordinary prompts overflow (finite weights can: one layer scaled by 1e37) is broken, and every
    score read against them would be NaN."""
    bad = not_finite(base["clean"])
    if not bad:
        return base
    suspect, anchor = bool(set(bad) & SUSPECT_ONLY), bool(set(bad) & ANCHOR_ONLY)
    who = {(True, False): "the suspect's", (False, True): "the anchor's", (True, True): "the suspect's and the "
           "anchor's"}.get((suspect, anchor), "the suspect's or the anchor's")
    raise CheckpointError(f"{who} outputs on clean prompts are not finite (NaN or inf in {', '.join(bad)}): a "
                          f"broken checkpoint, which the scan cannot judge")
