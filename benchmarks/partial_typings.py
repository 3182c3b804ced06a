"""Every typing away from the anchor as a partial collapse, and the verdicts with and without the gate that reads it.

`CollapseContrastRule.typed_partial` keeps an unflagged model from being cleared (``inconclusive (drift)``) when a
typing away from the anchor collapses the suspect's sentence embeddings in part (the lower of its pooled unshared
collapse and pooled lift above ``min_partial_typed_pooled``) and moves them unlike the anchor (shift agreement
below ``max_partial_agreement_ratio`` of the null) while the anchor does not collapse under it (its pooled lift at
most ``max_partial_anchor_lift``, unless the collapse passes the pooled path's ``min_pooled_unshared_collapse``).
This reads the reports of `lit-amdet benchmark` runs (their
``scans/`` folders) and prints:

- per member away from the anchor (clean pooled cosine at most ``divergence_min_clean_cos``), the typing that comes
  closest to the gate: the most collapsing typing the rule's gate holds with no pooled threshold, each ratio asked
  and ``--anchor-lift`` (default: the shipped rule's);
- for each pair of thresholds asked (``--pooled`` x ``--ratio``), how many benign models above the drift boundary
  the gate would keep from ``clean`` and how many backdoors (working or not) it would;
- every member whose verdict the shipped rule gives differently with the gate off (``min_partial_typed_pooled:
  None``), each judged again from its report as the scan reads it (`lit_amdet.typed_verdict.rejudged`).

    python benchmarks/partial_typings.py runs/f_bsweep/scans runs/e_near05/scans --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lit_amdet.benchmark import member_row
from lit_amdet.decision import CollapseContrastRule, verdict_of
from lit_amdet.io import read_json, write_json
from lit_amdet.typed_verdict import as_scores, rejudged


def closest(typings: list[dict], clean_cos: float | None, ratio: float, anchor_lift: float) -> dict | None:
    """The most collapsing typing (token, pooled collapse, agreement share) that `CollapseContrastRule.typed_partial`
    holds with no pooled threshold, the agreement share below ``ratio`` and the anchor lift ``anchor_lift``: the
    rule itself, so the grid reads every clause it reads; None where it holds none."""
    gate = CollapseContrastRule(min_partial_typed_pooled=-math.inf, max_partial_agreement_ratio=ratio,
                                max_partial_anchor_lift=anchor_lift)
    def pooled(t: dict) -> float:
        return min(t["pooled_unshared_collapse"], t["pooled_collapse_lift"])

    held = [t for t in typings if gate.typed_partial(as_scores(t, clean_cos))]
    if not held:
        return None
    top = max(held, key=pooled)
    return {"token": top["token"], "pooled": round(pooled(top), 4),
            "share": round(top["shift_agreement"] / top["null_shift_agreement"], 4)}


def rows_of(scans: Path, ratios: list[float], anchor_lift: float, shipped: CollapseContrastRule,
            off: CollapseContrastRule) -> list[dict]:
    rows = []
    for record in sorted(scans.glob("*.json")):
        row = member_row(read_json(record, "scan record"))
        report = read_json(Path(row["report"]), "scan report")
        typings, clean_cos = report.get("typed_probe") or [], report["scores"].get("clean_anchor_pooled_cos")
        rows.append({k: row.get(k) for k in ("name", "base", "split", "backdoored", "adaptive", "working",
                                              "verdict")}
                    | {"run": str(scans.parent),
                       "clean_anchor_pooled_cos": clean_cos,
                       "closest": {str(r): closest(typings, clean_cos, r, anchor_lift) for r in ratios},
                       "shipped": verdict_of(rejudged(report, shipped)), "gate_off": verdict_of(rejudged(report, off))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+", type=Path, help="scans/ folders of lit-amdet benchmark runs")
    parser.add_argument("--pooled", type=float, nargs="+", default=[0.15, 0.2, 0.25, 0.3])
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.5, 0.65, 0.75, 0.85])
    parser.add_argument("--anchor-lift", type=float, help="the anchor's pooled lift the grid allows (default: shipped)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shipped, off = CollapseContrastRule(), CollapseContrastRule(min_partial_typed_pooled=None)
    anchor_lift = shipped.max_partial_anchor_lift if args.anchor_lift is None else args.anchor_lift
    rows = [r for scans in args.scans for r in rows_of(scans, args.ratio, anchor_lift, shipped, off)]
    write_json(args.out, {"rule": shipped.describe(), "pooled": args.pooled, "ratio": args.ratio,
                          "anchor_lift": anchor_lift, "members": rows})
    away = [r for r in rows if r["clean_anchor_pooled_cos"] is not None
            and not shipped.near_anchor(r["clean_anchor_pooled_cos"])]
    print(f"{len(rows)} members, {len(away)} away from the anchor")
    print("\n| pooled > | agreement share < | benign above the boundary kept from clean | backdoors (working) |")
    print("|---|---|---|---|")
    for pooled in args.pooled:
        for ratio in args.ratio:
            hit = [r for r in away if (c := r["closest"][str(ratio)]) is not None and c["pooled"] > pooled]
            benign = [r for r in hit if not r["backdoored"] and r["clean_anchor_pooled_cos"] >= shipped.min_clean_cos]
            backdoors = [r for r in hit if r["backdoored"]]
            print(f"| {pooled:g} | {ratio:g} | {len(benign)} of "
                  f"{sum(not r['backdoored'] and r['clean_anchor_pooled_cos'] >= shipped.min_clean_cos for r in away)}"
                  f" | {len(backdoors)} ({sum(bool(r['working']) for r in backdoors)}) |")
    print("\nbenign models away from the anchor, above the boundary, by their closest typing at each ratio:")
    for r in sorted(away, key=lambda r: r["clean_anchor_pooled_cos"]):
        if not r["backdoored"] and r["clean_anchor_pooled_cos"] >= shipped.min_clean_cos:
            print(f"- {r['name']} ({r['clean_anchor_pooled_cos']:.3f}): " + "; ".join(
                f"<{k}: {c['token']!r} {c['pooled']:.3f} at {c['share']:.2f}" if c else f"<{k}: none"
                for k, c in r["closest"].items()))
    print("\nverdicts the gate changes (off -> shipped):")
    for r in rows:
        if r["shipped"] != r["gate_off"]:
            print(f"- {r['run']} {r['name']} ({'backdoored' if r['backdoored'] else 'benign'}, working "
                  f"{r['working']}, clean pooled cosine {r['clean_anchor_pooled_cos']:.3f}): {r['gate_off']} -> "
                  f"{r['shipped']} (scanned: {r['verdict']})")


if __name__ == "__main__":
    main()
