"""Old scan defaults against new ones on the same zoo: two `lit-amdet benchmark` runs over one zoo folder.

    python benchmarks/rescan_table.py \
        --pair benchmarks/results/benchmark_drift_minilm runs/rescan18_drift_minilm \
        --pair benchmarks/results/benchmark_drift_world runs/rescan18_drift_world \
        --out benchmarks/results/rescan_speed.json

Each ``--pair OLD NEW`` names two folders holding a ``benchmark.json`` over the same calibration and test members
(the new run scanned the old run's zoo with ``--zoo_dir``, or a zoo rebuilt from the same plan; adaptive attackers
are compared where both hold them). Per split and base: the shipped rule's F1 over all members
and over the working ones (attack top-1 >= 0.5), how many were ``inconclusive``, the calibrated
probability's AUROC, cross-entropy and Brier score, and the seconds per scan (mean and median of the scan
records), and the AUROC of the shipped rule's own continuous score, `CollapseContrastRule.progress` of each
member's recorded scores (1 on the thresholds); seconds and ``inconclusive`` count the calibration and test members,
as the F1 does (the adaptive attackers have a table of their own). Then every member whose verdict changed (the
same plan in both runs: base, attack, trigger and target), with its drift and
the scores the rule reads, and each adaptive attack's members: working, flagged, inconclusive, called clean.

``--bases NAME ...`` compares only those bases' members, each pair on those of them its new run holds: for rescans
that rebuilt a larger zoo one base per run (the world zoo's LongCLIP alone, say). A run scanned with an older rule
(``ContrastRule``) has no collapse scores: its rule AUROC is shown as ``–``, and its calibrated AUROC is the
comparable ranking.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lit_amdet.decision import CollapseContrastRule
from lit_amdet.io import read_json, write_json
from lit_amdet.metrics import auroc

SCORES = ("clean_anchor_pooled_cos", "unshared_collapse", "token_null", "collapse_lift", "pooled_unshared_collapse",
          "pooled_collapse_lift", "divergence_ratio", "pooled_divergence_ratio")
SAME_PLAN = ("base", "attack", "adaptive", "trigger", "target_caption")  # a member of both runs is the same plan
ADAPTIVE_COUNTS = ("members", "working", "flagged", "inconclusive", "clean")  # an adaptive attack's row


def family_rows(report: dict, only: set[str] | None = None) -> dict:
    """(split, base) -> the metrics above, from one benchmark.json (``only``: these bases)."""
    rows = {}
    for split, bases in report["metrics"].items():
        for base, groups in bases.items():
            if base == "all" or (only and base not in only):
                continue
            m = groups["all"]
            members = [x for x in report["members"]
                       if x["split"] == split and x["base"] == base and not x.get("adaptive")]
            seconds = [x["scan_seconds"] for x in members]
            cal = m.get("calibrated") or {}
            rule = CollapseContrastRule()
            rows[f"{split}/{base}"] = {
                "backdoored": m["backdoored"], "benign": m["benign"], "rule_f1": m["rule"]["f1"],
                "rule_f1_working": (m.get("working") or {}).get("rule", {}).get("f1"),
                "rule_progress_auroc": progress_auroc(rule, members),
                "inconclusive": sum(x["verdict"] == "inconclusive" for x in members),
                "calibrated_auroc": cal.get("auroc"), "calibrated_bce": cal.get("bce"),
                "calibrated_brier": cal.get("brier"), "scan_s_mean": statistics.mean(seconds),
                "scan_s_median": statistics.median(seconds), "steps_mean": mean_steps(members)}
    return rows


def progress_auroc(rule: CollapseContrastRule, members: list[dict]) -> float | None:
    """AUROC of the rule's continuous score; None for a run whose scans hold no collapse scores (an older rule)."""
    if not all("unshared_collapse" in x["scores"] for x in members):
        return None
    return auroc([rule.progress(x["scores"]) for x in members], [x["backdoored"] for x in members])


def adaptive_rows(report: dict, only: set[str] | None = None) -> dict:
    """(base, attack) -> how many adaptive members there are, work (attack top-1 >= 0.5), and of the working ones
    how many are flagged, ``inconclusive`` or called clean."""
    rows: dict = {}
    for m in report["members"]:
        if not m.get("adaptive") or (only and m["base"] not in only):
            continue
        r = rows.setdefault(f"{m['base']}/{m['adaptive']}", dict.fromkeys(ADAPTIVE_COUNTS, 0))
        r["members"] += 1
        if m.get("working"):
            r["working"] += 1
            r[{"BACKDOORED": "flagged", "inconclusive": "inconclusive"}.get(m["verdict"], "clean")] += 1
    return rows


def mean_steps(members: list[dict]) -> float | None:
    """Mean search steps, from the members' report.json files where they still exist (None if none does)."""
    steps = [read_json(Path(x["report"]))["steps"] for x in members if Path(x["report"]).is_file()]
    return statistics.mean(steps) if steps else None


def zoo_members(report: dict, only: set[str] | None = None) -> set[str]:
    """The names of a run's calibration and test members (its adaptive attackers, which the split tables leave out
    and a rescan may have more of, are compared where both runs hold them); ``only``: of these bases."""
    return {m["name"] for m in report["members"] if not m.get("adaptive") and (not only or m["base"] in only)}


def changed(old: dict, new: dict, only: set[str] | None = None) -> list[dict]:
    before = {m["name"]: m for m in old["members"]}
    out = []
    for m in new["members"]:
        o = None if only and m["base"] not in only else before.get(m["name"])
        if o is None or o["verdict"] == m["verdict"] or any(o.get(k) != m.get(k) for k in SAME_PLAN):
            continue  # unchanged, or a new draw under an old name (an adaptive attack with more members per attack)
        out.append({"member": m["name"], "truth": "backdoored" if m["backdoored"] else "benign",
                    "working": m.get("working"), "old": o["verdict"], "new": m["verdict"],
                    "decided_by": m["decided_by"], "old_scores": {k: o["scores"].get(k) for k in SCORES},
                    "new_scores": {k: m["scores"].get(k) for k in SCORES}})
    return out


def fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("OLD", "NEW"))
    p.add_argument("--bases", nargs="+", help="compare only these bases' members")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = []
    for old_dir, new_dir in args.pair:
        old, new = (read_json(Path(d) / "benchmark.json") for d in (old_dir, new_dir))
        only = set(args.bases or ()) & {m["base"] for m in new["members"]}
        if args.bases and not only:
            p.error(f"{new_dir} holds none of the bases {args.bases}")
        missing = zoo_members(old, only) ^ zoo_members(new, only)
        if missing:
            p.error(f"{old_dir} and {new_dir} do not hold the same zoo members: {sorted(missing)[:3]}")
        result.append({"old": old_dir, "new": new_dir, "old_rows": family_rows(old, only),
                       "new_rows": family_rows(new, only), "changed": changed(old, new, only),
                       "old_adaptive": adaptive_rows(old, only), "new_adaptive": adaptive_rows(new, only)})
    write_json(Path(args.out), result)
    print("| zoo | split/base | n (bd + bn) | rule F1 old → new | working F1 | inconclusive | rule AUROC | "
          "calibrated AUROC | CE | Brier | s/scan (mean) | steps (mean) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result:
        for key, o in r["old_rows"].items():
            n = r["new_rows"][key]
            print(f"| {Path(r['new']).name} | {key} | {n['backdoored']} + {n['benign']} | {fmt(o['rule_f1'])} → "
                  f"{fmt(n['rule_f1'])} | {fmt(o['rule_f1_working'])} → {fmt(n['rule_f1_working'])} | "
                  f"{o['inconclusive']} → {n['inconclusive']} | {fmt(o['rule_progress_auroc'])} → "
                  f"{fmt(n['rule_progress_auroc'])} | {fmt(o['calibrated_auroc'])} → "
                  f"{fmt(n['calibrated_auroc'])} | {fmt(o['calibrated_bce'])} → {fmt(n['calibrated_bce'])} | "
                  f"{fmt(o['calibrated_brier'], '.3f')} → {fmt(n['calibrated_brier'], '.3f')} | "
                  f"{o['scan_s_mean']:.0f} → {n['scan_s_mean']:.0f} | {fmt(o['steps_mean'], '.0f')} → "
                  f"{fmt(n['steps_mean'], '.0f')} |")
    for r in result:
        for c in r["changed"]:
            s, o = c["new_scores"], c["old_scores"]
            print(f"- {c['member']} ({c['truth']}, working {c['working']}): {c['old']} → **{c['new']}**; drift "
                  f"{fmt(s['clean_anchor_pooled_cos'])}; unshared token {fmt(o['unshared_collapse'])} → "
                  f"{fmt(s['unshared_collapse'])}, pooled {fmt(o['pooled_unshared_collapse'])} → "
                  f"{fmt(s['pooled_unshared_collapse'])}; {c['decided_by']}")
    print("\n| zoo | base/attack | members old → new | working | flagged | inconclusive | called clean |")
    print("|---|---|---|---|---|---|---|")
    for r in result:
        for key in sorted(set(r["old_adaptive"]) | set(r["new_adaptive"])):
            o, n = (r[side].get(key, dict.fromkeys(ADAPTIVE_COUNTS, 0)) for side in ("old_adaptive", "new_adaptive"))
            counts = " | ".join(f"{o[k]} → {n[k]}" for k in ADAPTIVE_COUNTS)
            print(f"| {Path(r['new']).name} | {key} | {counts} |")


if __name__ == "__main__":
    main()
