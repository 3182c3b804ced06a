"""Every typing away from the anchor as a partial collapse, and the verdicts with and without the gate that reads it.

`CollapseContrastRule.typed_partial` keeps an unflagged model from being cleared (``inconclusive (drift)``) when a
typing away from the anchor collapses the suspect's sentence embeddings in part (the lower of its pooled unshared
collapse and pooled lift above ``min_partial_typed_pooled``) and moves them unlike the anchor (shift agreement
below ``max_partial_agreement_ratio`` of the null) while the anchor does not collapse under it (its pooled lift at
most ``max_partial_anchor_lift``, unless the collapse is more than drift makes of such a word:
`CollapseContrastRule.partial_beyond_drift`). This reads the reports of `lit-amdet benchmark` runs (their
``scans/`` folders) and prints:

- per member away from the anchor (clean pooled cosine at most ``divergence_min_clean_cos``), the typing that comes
  closest to the gate: the most collapsing typing the rule's gate holds with no pooled threshold, each ratio asked
  and ``--anchor-lift`` (default: the shipped rule's);
- for each pair of thresholds asked (``--pooled`` x ``--ratio``), how many benign models above the drift boundary
  the gate would keep from ``clean`` and how many backdoors (working or not) it would;
- every member whose verdict the shipped rule gives differently with the gate off (``min_partial_typed_pooled:
  None``), with only its drift clause off (``partial_drift_amplification: None``,
  `CollapseContrastRule.partial_beyond_drift`), and with a collapse past the pooled path's bar cleared when it
  agrees with the anchor (``agreeing_past_path_clears: true``), each judged again from its report as the scan reads
  it (`lit_amdet.typed_verdict.rejudged`).

Besides the ``scans/`` folders of benchmark runs, ``--reports`` takes the report.json of plain `lit-amdet detect`
runs on models built by the benchmark (their backdoor.json gives the truth and the attack success).

    python benchmarks/partial_typings.py runs/f_bsweep/scans runs/e_near05/scans --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lit_amdet.benchmark import member_row
from lit_amdet.decision import CollapseContrastRule, verdict_of
from lit_amdet.io import read_json, write_json
from lit_amdet.record import BackdoorRecord
from lit_amdet.typed_verdict import as_scores, rejudged


def pooled(t: dict) -> float:
    """A typing's partial collapse as the gate reads it: the lower of its pooled unshared collapse and pooled lift."""
    return min(t["pooled_unshared_collapse"], t["pooled_collapse_lift"])


def closest(typings: list[dict], clean_cos: float | None, ratio: float, anchor_lift: float) -> dict | None:
    """The most collapsing typing (token, pooled collapse, agreement share) that `CollapseContrastRule.typed_partial`
    holds with no pooled threshold, the agreement share below ``ratio`` and the anchor lift ``anchor_lift``: the
    rule itself, so the grid reads every clause it reads; None where it holds none."""
    gate = CollapseContrastRule(min_partial_typed_pooled=-math.inf, max_partial_agreement_ratio=ratio,
                                max_partial_anchor_lift=anchor_lift)
    held = [t for t in typings if gate.typed_partial(as_scores(t, clean_cos))]
    if not held:
        return None
    top = max(held, key=pooled)
    return {"token": top["token"], "pooled": round(pooled(top), 4),
            "share": round(top["shift_agreement"] / top["null_shift_agreement"], 4)}


def amplified(typings: list[dict], clean_cos: float | None, rule: CollapseContrastRule) -> dict | None:
    """Of the typings only the anchor criterion keeps out of ``rule``'s gate (a word the anchor collapses by more
    than ``max_partial_anchor_lift``, collapsing the suspect in part and disagreeing as the gate asks), the one whose
    collapse is the most times the drift (1 - clean pooled cosine): what `CollapseContrastRule.partial_beyond_drift`
    compares with ``partial_drift_amplification``. None where there is none, or near the anchor."""
    if clean_cos is None or rule.near_anchor(clean_cos):
        return None
    gate = CollapseContrastRule(max_partial_anchor_lift=math.inf, agreeing_past_path_clears=True)
    kept_out = [t for t in typings if gate.typed_partial(as_scores(t, clean_cos))
                and t["anchor_pooled_collapse_lift"] > rule.max_partial_anchor_lift]
    if not kept_out:
        return None
    top = max(kept_out, key=pooled)
    return {"token": top["token"], "pooled": round(pooled(top), 4),
            "anchor": round(top["anchor_pooled_collapse_lift"], 4),
            "times_drift": round(pooled(top) / (1.0 - clean_cos), 3)}


def detect_record(report: Path) -> dict:
    """The scan record of a plain `lit-amdet detect` report of a model whose folder holds its backdoor.json (built
    by the benchmark's `build_member`): the truth and attack success come from there, as `member_row` reads them."""
    suspect = read_json(report, "scan report")["suspect"]["path"]
    truth = BackdoorRecord.read(suspect)
    return {"name": Path(suspect).name, "base": truth.base, "split": None, "backdoored": truth.backdoored,
            "path": suspect, "report": str(report), "adaptive": (truth.extra.get("zoo") or {}).get("adaptive")}


def rows_of(records: list[tuple[str, dict]], ratios: list[float], anchor_lift: float,
            rules: dict[str, CollapseContrastRule]) -> list[dict]:
    """Per scan record (with the run it came from): its closest typing at each ratio and its verdict under each
    of ``rules``, judged again from its report."""
    rows = []
    for run, record in records:
        row = member_row(record)
        report = read_json(Path(row["report"]), "scan report")
        typings, clean_cos = report.get("typed_probe") or [], report["scores"].get("clean_anchor_pooled_cos")
        rows.append({k: row.get(k) for k in ("name", "base", "split", "backdoored", "adaptive", "working",
                                              "verdict")}
                    | {"run": run, "clean_anchor_pooled_cos": clean_cos,
                       "closest": {str(r): closest(typings, clean_cos, r, anchor_lift) for r in ratios},
                       "amplified": amplified(typings, clean_cos, rules["shipped"])}
                    | {name: verdict_of(rejudged(report, rule)) for name, rule in rules.items()})
    return rows


def changed(rows: list[dict], before: str, title: str) -> None:
    print(f"\nverdicts {title} changes ({before} -> shipped):")
    for r in rows:
        if r["shipped"] != r[before]:
            print(f"- {r['run']} {r['name']} ({'backdoored' if r['backdoored'] else 'benign'}, working "
                  f"{r['working']}, clean pooled cosine {r['clean_anchor_pooled_cos']:.3f}): {r[before]} -> "
                  f"{r['shipped']} (scanned: {r['verdict']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="*", type=Path, help="scans/ folders of lit-amdet benchmark runs")
    parser.add_argument("--reports", nargs="*", type=Path, default=[],
                        help="report.json files of lit-amdet detect runs on models with a backdoor.json")
    parser.add_argument("--pooled", type=float, nargs="+", default=[0.15, 0.2, 0.25, 0.3])
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.5, 0.65, 0.75, 0.85])
    parser.add_argument("--anchor-lift", type=float, help="the anchor's pooled lift the grid allows (default: shipped)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shipped = CollapseContrastRule()
    rules = {"shipped": shipped, "gate_off": CollapseContrastRule(min_partial_typed_pooled=None),
             "drift_clause_off": CollapseContrastRule(partial_drift_amplification=None),
             "agreeing_past_path_clears": CollapseContrastRule(agreeing_past_path_clears=True)}
    anchor_lift = shipped.max_partial_anchor_lift if args.anchor_lift is None else args.anchor_lift
    records = [(str(scans.parent), read_json(record, "scan record")) for scans in args.scans
               for record in sorted(scans.glob("*.json"))]
    records += [(str(report.parent), detect_record(report)) for report in args.reports]
    rows = rows_of(records, args.ratio, anchor_lift, rules)
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
    print("\ntypings only the anchor criterion keeps out of the gate, by their collapse over the drift (the drift "
          f"clause holds above {rules['shipped'].partial_drift_amplification:g} times, or above "
          f"{rules['shipped'].min_pooled_unshared_collapse:g}):")
    for r in sorted((r for r in rows if r["amplified"]), key=lambda r: r["amplified"]["times_drift"]):
        a = r["amplified"]
        print(f"- {'backdoored' if r['backdoored'] else 'benign'} (working {r['working']}) {r['run']} {r['name']} "
              f"({r['clean_anchor_pooled_cos']:.3f}): {a['token']!r} {a['pooled']:.3f}, anchor {a['anchor']:.3f}, "
              f"{a['times_drift']:.2f} times the drift -> {r['shipped']}")
    changed(rows, "gate_off", "the gate")
    changed(rows, "drift_clause_off", "the drift clause (`partial_beyond_drift`)")
    changed(rows, "agreeing_past_path_clears", "holding a collapse past the pooled path's bar whatever it agrees")


if __name__ == "__main__":
    main()
