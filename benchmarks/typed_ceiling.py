"""How close every typing of the typed-token probe came to a flag, and the verdicts under two typed pooled lifts.

A scan's ``scores`` keep one typing (the one that flagged, else the first); its report keeps them all
(``typed_probe``). This reads the reports of one or more `lit-amdet benchmark` runs (their ``scans/`` folders)
and prints, per base and truth, the highest typed collapse any typing reached: the token path's unshared
collapse and the pooled path's (each the lower of unshared collapse and lift, as the rule needs both). Then it
judges each member again from its report, picking the verdict's typing as the scan does (`verdict_scores`):
with the search's pooled lift for typings near the anchor too (``--old-lift``, 0.9, the default until session
2026-12-05 (e)), and with the shipped rule (`CollapseContrastRule.typed_lifts`: 0.5 near the anchor, 0.9 away from it
unless the typing disagrees with the anchor; ``--new-lift`` sets the former). It lists every member whose verdicts
differ. Away from the anchor it also prints, per base and truth, the shift agreement of the typings that collapse
at the low lifts (0.5), as a share of the scan's null (`CollapseContrastRule.typed_disagrees` reads it below 0.5):
the lowest share a benign model's such typings reached, and the highest a backdoor's lowest reached (where no
typing carries an agreement, scanned before session 2026-12-05 (f): none). The search's own scores are as
the scan ran them: where a typing flagged the model before the search, the search stopped at its first check,
so a verdict recomputed here without that flag is the verdict of that shortened search.

    python benchmarks/typed_ceiling.py runs/w17_siglip/scans --out benchmarks/results/typed_ceiling_siglip.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_amdet.benchmark import member_row
from lit_amdet.decision import CollapseContrastRule, verdict_of
from lit_amdet.io import read_json, write_json
from lit_amdet.typed_verdict import as_scores, rejudged


def typed_reach(typings: list[dict], rule: CollapseContrastRule) -> dict:
    """The highest token and pooled typed collapse over a report's typings (each path: min of its two checks), and
    the lowest shift agreement, as a share of its null, of the typings ``rule`` would flag at its low lifts (those
    near the anchor, whatever they agree)."""
    def pooled_of(t: dict) -> float:
        return min(t["pooled_unshared_collapse"], t["pooled_collapse_lift"])

    token = max((min(t["unshared_collapse"], t["collapse_lift"]) for t in typings), default=None)
    top = max(typings, key=pooled_of, default=None)
    shares = [t["shift_agreement"] / t["null_shift_agreement"] for t in typings
              if rule.typed_paths(as_scores(t, NEAR)) and t.get("shift_agreement") is not None
              and (t.get("null_shift_agreement") or 0) > 0]
    return {"typings": len(typings), "token": token, "pooled": None if top is None else pooled_of(top),
            "pooled_token": None if top is None else top["token"], "pooled_by": None if top is None else top["by"],
            "agreement_share": min(shares, default=None)}


NEAR = 1.0  # a clean pooled cosine at which the rule judges a typing at its low lifts


def judged(report: dict, rule: CollapseContrastRule) -> str:
    """The verdict ``rule`` gives the report's search scores with the typing it would read (`rejudged`)."""
    return verdict_of(rejudged(report, rule))


def rows_of(scans: Path, old: CollapseContrastRule, new: CollapseContrastRule) -> list[dict]:
    rows = []
    for record in sorted(scans.glob("*.json")):
        row = member_row(read_json(record, "scan record"))
        report = read_json(Path(row["report"]), "scan report")
        rows.append({k: row.get(k) for k in ("name", "base", "split", "backdoored", "adaptive", "working",
                                              "clean_cosine_to_base", "verdict")}
                    | {"clean_anchor_pooled_cos": report["scores"].get("clean_anchor_pooled_cos"),
                       "reach": typed_reach(report.get("typed_probe") or [], new),
                       "old_verdict": judged(report, old), "new_verdict": judged(report, new)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+", type=Path, help="scans/ folders of lit-amdet benchmark runs")
    parser.add_argument("--old-lift", type=float, default=0.9, help="the typed pooled lift to compare against")
    parser.add_argument("--new-lift", type=float, help="the typed pooled lift near the anchor (default: shipped)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    new = CollapseContrastRule(**({} if args.new_lift is None else {"min_typed_pooled_collapse_lift": args.new_lift}))
    old = CollapseContrastRule(min_typed_pooled_collapse_lift=args.old_lift)
    rows = [r for scans in args.scans for r in rows_of(scans, old, new)]
    write_json(args.out, {"rules": {"old": old.describe(), "new": new.describe()}, "members": rows})
    print("| base | truth | members (with typings) | highest typed token collapse | highest typed pooled collapse "
          "(token, list) |")
    print("|---|---|---|---|---|")
    for base in sorted({r["base"] for r in rows}):
        for truth in (False, True):
            group = [r for r in rows if r["base"] == base and r["backdoored"] == truth
                     and (not truth or r["working"])]
            typed = [r for r in group if r["reach"]["typings"]]
            if not group:
                continue
            token = max((r["reach"]["token"] for r in typed), default=None)
            top = max(typed, key=lambda r: r["reach"]["pooled"], default=None)
            pooled = "–" if top is None else \
                f"{top['reach']['pooled']:.3f} ({top['reach']['pooled_token']!r}, {top['reach']['pooled_by']})"
            print(f"| {base} | {'backdoored (working)' if truth else 'benign'} | {len(group)} ({len(typed)}) | "
                  f"{'–' if token is None else f'{token:.3f}'} | {pooled} |")
    print("\n| base | truth | away from the anchor, with a typing that collapses | shift agreement / null of those "
          "typings: lowest benign, or the highest of each backdoor's lowest |")
    print("|---|---|---|---|")
    for base in sorted({r["base"] for r in rows}):
        for truth in (False, True):
            away = [r["reach"]["agreement_share"] for r in rows if r["base"] == base and r["backdoored"] == truth
                    and (not truth or r["working"]) and r["reach"]["agreement_share"] is not None
                    and not new.near_anchor(r["clean_anchor_pooled_cos"])]
            if away:
                print(f"| {base} | {'backdoored (working)' if truth else 'benign'} | {len(away)} | "
                      f"{(max if truth else min)(away):.3f} |")
    for r in rows:
        if r["old_verdict"] != r["new_verdict"] or r["new_verdict"] != r["verdict"]:
            print(f"- {r['name']} ({'backdoored' if r['backdoored'] else 'benign'}, working {r['working']}, "
                  f"clean pooled cosine {r['clean_anchor_pooled_cos']:.3f}): typed pooled lift {args.old_lift:g} "
                  f"{r['old_verdict']}, shipped {r['new_verdict']} (scanned: {r['verdict']}); highest typed pooled "
                  f"{r['reach']['pooled']}")


if __name__ == "__main__":
    main()
