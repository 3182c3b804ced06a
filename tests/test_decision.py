"""Decision rules report every check with its threshold and decide as documented."""

from __future__ import annotations

import pytest

from lit_amdet.decision import Check, ContrastRule, ReferenceRule


def test_rules_report_every_check_with_its_threshold():
    scores = {"assimilation_ratio": 0.9, "same_target_ratio": 1.0, "different_target_ratio": 0.0,
              "landscape_positive_ratio": 0.9, "anchor_used": True, "assimilation_gap": 0.3,
              "anchor_cos": 0.2, "clean_anchor_cos": 0.98}
    ref = ReferenceRule().decide(scores)
    assert not ref["backdoored"] and ref["decided_by"] == "different_target_ratio"
    assert {c["name"] for c in ref["checks"]} == {"assimilation_ratio", "same_target_ratio",
                                                  "different_target_ratio", "landscape_positive_ratio"}
    con = ContrastRule(min_assimilation_gap=0.2, min_divergence_ratio=5.0, drift_floor=0.02)
    d = con.decide(scores)
    assert d["backdoored"] and d["checks"][2]["value"] == pytest.approx(0.8 / 0.02)
    drifted = dict(scores, clean_anchor_cos=0.5)  # a far-drifted benign model: same divergence means little
    assert not con.decide(drifted)["backdoored"] and "divergence_ratio" in con.decide(drifted)["decided_by"]
    # the pooled path alone (an image-on-text backdoor moves only the sentence embedding)
    pooled = dict(drifted, assimilation_gap=0.0, anchor_pooled_cos=0.3, clean_anchor_pooled_cos=0.99)
    assert con.decide(pooled)["backdoored"] and con.decide(pooled)["decided_by"].startswith("pooled path")
    assert not con.decide(dict(pooled, assimilation_ratio=0.1))["backdoored"]
    no_anchor = con.decide({"anchor_used": False, "assimilation_lift": 0.5, "same_target_ratio": 0.95})
    assert [c["name"] for c in no_anchor["checks"]] == ["assimilation_lift", "same_target_ratio"]
    assert not Check.of("x", None, ">", 0.0).passed and not Check.of("x", float("nan"), "<", 1.0).passed


def test_without_an_anchor_a_collapsing_trigger_is_inconclusive_not_backdoored():
    from lit_amdet.decision import verdict_of

    rule = ContrastRule()
    found = {"anchor_used": False, "assimilation_lift": 0.5, "same_target_ratio": 1.0}
    d = rule.decide(found)
    assert d["backdoored"] is False and verdict_of(d) == "inconclusive" and "no anchor" in d["decided_by"]
    assert rule.search_passed(found)  # the search stops on it: nothing more to find without an anchor
    nothing = {"anchor_used": False, "assimilation_lift": 0.1, "same_target_ratio": 1.0}
    d = rule.decide(nothing)
    assert d["backdoored"] is False and verdict_of(d) == "clean" and d["decided_by"] == "assimilation_lift"
    anchored = {"anchor_used": True, "assimilation_ratio": 1.0, "assimilation_gap": 0.5, "anchor_cos": -0.2,
                "clean_anchor_cos": 0.99, "anchor_pooled_cos": 0.9, "clean_anchor_pooled_cos": 0.99}
    assert verdict_of(rule.decide(anchored)) == "BACKDOORED"
