"""How the verdict reads the typed-token probe's typings (`lit_amdet.token_probe`): each typing as the ``typed_*``
scores `lit_amdet.decision.CollapseContrastRule` judges, which typing the verdict rests on, and the float32 retyping
of a typing screened in bfloat16 that comes close to a threshold.

A typing judged away from the anchor also carries its **shift agreement** (`lit_amdet.assimilation.shift_agreement`)
and the scan's null for it (the same agreement of random vocabulary tokens typed alone): a benign fine-tune's
typed collapse is the model over-reading the token, and the token moves the anchor the same way; a backdoor sends
the suspect to its target, where the anchor does not go (`CollapseContrastRule.typed_disagrees`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lit_amdet.collapse import COLLAPSE_SCORES

__all__ = ["SCREEN_MARGIN", "as_scores", "deciding_typing", "rejudged", "screened_near", "typed_flagged",
           "verdict_scores", "verdict_typing"]

#: how close to a typed path's thresholds a typing screened in bfloat16 must come to be typed again in float32
#: (`screened_near`): every score the rule reads is moved by this much towards flagging. The largest difference
#: between the two precisions over the 763 typings of 18 MiniLM scans on a CPU was 0.0023, 20x less (`BENCHMARKS.md`,
#: "The typings screened in bfloat16"). Not measured on the world families or a GPU: the lifts divide a score's
#: change by 1 - its clean value (at least 0.02), so a family whose clean outputs agree closely magnifies a bfloat16
#: error more; where that could pass the margin, `vocabulary_precision: float32` types everything in float32
SCREEN_MARGIN = 0.05
#: the typing's scores the rule reads as upper bounds (below its threshold is towards flagging)
LOWERED = ("shift_agreement",)


def screened_near(rule, margin: float = SCREEN_MARGIN, clean_cos: float | None = None) -> Callable[[dict], bool]:
    """Whether the rule (`CollapseContrastRule.typed_paths`) would flag a typing of `probe_tokens` if each of its
    lifts and unshared collapses were ``margin`` higher and its shift agreement ``margin`` lower: `probe_tokens`'
    ``near``. ``clean_cos``: the suspect's clean pooled cosine to the anchor, which sets the typed lifts."""
    raised = {lift for names in COLLAPSE_SCORES.values() for lift in (names[0], names[2])}

    def moved(k: str, v):
        if v is None or not isinstance(v, float):
            return v
        return v + margin if k in raised else v - margin if k in LOWERED else v

    def near(probed: dict) -> bool:
        if any(isinstance(probed.get(k), float) and math.isnan(probed[k]) for k in raised):
            return True  # not measured at the screen's precision: measure it in float32
        return typed_flagged([{k: moved(k, v) for k, v in probed.items()}], rule, clean_cos)

    return near


def as_scores(probed: dict, clean_cos: float | None = None) -> dict:
    """A typing of `probe_tokens` as the ``typed_*`` scores the rule reads, with the suspect's drift where known."""
    drift = {} if clean_cos is None else {"clean_anchor_pooled_cos": clean_cos}
    return {"typed_token": probed["token"], **drift,
            **{f"typed_{k}": v for k, v in probed.items() if k not in ("token", "ids", "by", "precision")}}


def typed_flagged(probed: list[dict], rule, clean_cos: float | None = None) -> bool:
    """Whether the rule (`CollapseContrastRule.typed_paths`) flags any typing of `probe_tokens`' list, for a
    suspect at clean pooled cosine ``clean_cos`` to its anchor (None: not known, the stricter typed lifts)."""
    return any(rule.typed_paths(as_scores(p, clean_cos)) for p in probed)


def verdict_typing(probed: list[dict], rule, clean_cos: float | None = None) -> dict | None:
    """The typing of `probe_tokens`' list the verdict reads: the first one the rule flags (at ``clean_cos``, as
    `typed_flagged`), else the first that keeps it from clearing the model (`CollapseContrastRule.typed_partial`),
    else the first (the most moved token alone); None without a probe."""
    judged = [as_scores(p, clean_cos) for p in probed]
    return next((p for p, s in zip(probed, judged) if rule.typed_paths(s)),
                next((p for p, s in zip(probed, judged) if rule.typed_partial(s)), probed[0] if probed else None))


def verdict_scores(probed: list[dict], rule, clean_cos: float | None = None) -> dict:
    """`verdict_typing` as the ``typed_*`` scores the rule reads; {} without a probe."""
    typing = verdict_typing(probed, rule, clean_cos)
    return {} if typing is None else as_scores(typing)


def rejudged(report: dict, rule) -> dict:
    """The decision ``rule`` gives a scan's ``report.json`` from its search scores and the typing it would read
    (`verdict_scores` over the report's ``typed_probe``): a stored scan judged again by another rule. The search
    ran as the scan's rule steered it (where a typing flagged before the search, it stopped at its first check)."""
    search = {k: v for k, v in report["scores"].items() if not k.startswith("typed_")}
    typed = verdict_scores(report.get("typed_probe") or [], rule, search.get("clean_anchor_pooled_cos"))
    return rule.decide({**search, **typed})


def deciding_typing(probed: list[dict], rule, scores: dict) -> dict | None:
    """The typing that flagged the model when no path of the search did (``scores`` without the ``typed_*`` ones
    pass none), else None: its target, not the search's, is then the one worth showing."""
    if not probed or rule.decide({k: v for k, v in scores.items() if not k.startswith("typed_")})["backdoored"]:
        return None
    clean_cos = scores.get("clean_anchor_pooled_cos")
    typing = verdict_typing(probed, rule, clean_cos)
    return typing if rule.typed_paths(as_scores(typing, clean_cos)) else None
