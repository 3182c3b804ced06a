"""Every typing away from the anchor as a partial collapse, and the verdicts with and without the gate that reads it.

`CollapseContrastRule.typed_partial` keeps an unflagged model from being cleared (``inconclusive (drift)``) when a
typing away from the anchor collapses the suspect's sentence embeddings in part (the lower of its pooled unshared
collapse and pooled lift above ``min_partial_typed_pooled``) and moves them unlike the anchor (shift agreement
below ``max_partial_agreement_ratio`` of the null) while the anchor does not collapse under it (its pooled lift at
most ``max_partial_anchor_lift``, unless the collapse passes the pooled path's ``min_pooled_unshared_collapse``).
This reads the reports of `lit-amdet benchmark` runs (their
``scans/`` folders) and prints:

- per member away from the anchor (clean pooled cosine at most ``divergence_min_clean_cos``), the typing that comes
  closest to the gate: the most collapsing typing among those whose agreement share is below each ratio asked
  and whose anchor lift is at most ``--anchor-lift`` (default: the shipped rule's);
- for each pair of thresholds asked (``--pooled`` x ``--ratio``), how many benign models above the drift boundary
  the gate would keep from ``clean`` and how many backdoors (working or not) it would;
- every member whose verdict the shipped rule gives differently with the gate off (``min_partial_typed_pooled:
  None``), each judged again from its report as the scan reads it (`lit_amdet.typed_verdict.rejudged`).

    python benchmarks/partial_typings.py runs/f_bsweep/scans runs/e_near05/scans --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_amdet.benchmark import member_row
from lit_amdet.decision import CollapseContrastRule, verdict_of
from lit_amdet.io import read_json, write_json
from lit_amdet.typed_verdict import rejudged


def typing_point(typing: dict, anchor_lift: float, unshared: float = CollapseContrastRule().min_pooled_unshared_collapse
                 ) -> tuple[float, float] | None:
    """A typing's (pooled collapse, agreement share): the lower of its pooled unshared collapse and pooled lift, and
    its shift agreement over the null's; None where it carries no agreement, the null is not above 0, or the
    anchor's pooled lift under it is above ``anchor_lift`` while the collapse is at most ``unshared``."""
    agreement, null = typing.get("shift_agreement"), typing.get("null_shift_agreement")
    pooled = min(typing["pooled_unshared_collapse"], typing["pooled_collapse_lift"])
    if agreement is None or null is None or null <= 0 or \
            (typing["anchor_pooled_collapse_lift"] > anchor_lift and pooled <= unshared):
        return None
    return pooled, agreement / null


def closest(typings: list[dict], ratio: float, anchor_lift: float) -> dict | None:
    """The most collapsing typing whose agreement share is below ``ratio`` and whose anchor lift is at most
    ``anchor_lift`` (token, pooled, share), or None."""
    points = [(typing_point(t, anchor_lift), t["token"]) for t in typings]
    below = [(p, token) for p, token in points if p is not None and p[1] < ratio]
    if not below:
        return None
    (pooled, share), token = max(below, key=lambda b: b[0][0])
    return {"token": token, "pooled": round(pooled, 4), "share": round(share, 4)}


def rows_of(scans: Path, ratios: list[float], anchor_lift: float, shipped: CollapseContrastRule,
            off: CollapseContrastRule) -> list[dict]:
    rows = []
    for record in sorted(scans.glob("*.json")):
        row = member_row(read_json(record, "scan record"))
        report = read_json(Path(row["report"]), "scan report")
        typings = report.get("typed_probe") or []
        rows.append({k: row.get(k) for k in ("name", "base", "split", "backdoored", "adaptive", "working",
                                              "verdict")}
                    | {"run": str(scans.parent),
                       "clean_anchor_pooled_cos": report["scores"].get("clean_anchor_pooled_cos"),
                       "closest": {str(r): closest(typings, r, anchor_lift) for r in ratios},
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
