"""One table from several `drift_probe.py` runs: every model's scores, judged by the old and the new default rule.

Each row is one scan as it ran (its run's scan settings are kept in the output); the verdicts are recomputed
from the scan's recorded scores with `ContrastRule` (the previous default) and `CollapseContrastRule` (the new
one, with its shipped thresholds), so a run scanned before a threshold changed is judged as the shipped rule
judges it. A model in several runs is taken from the last run given.

    python benchmarks/drift_table.py runs/pooled3/results.json runs/pooled5/results.json \\
        --out benchmarks/results/drift_collapse.json

``--scans DIR`` reads a `lit-amdet benchmark` run's scan records instead (its ``scans/`` folder, finished or
not) and prints per band of drift *reached* (the clean pooled cosine to the base; a sweep member's planned
level is not always where its training stopped) the counts and F1 of both rules for the sweep members, the
grid members apart, with every member whose verdict the two rules disagree on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_amdet.benchmark import member_row
from lit_amdet.decision import BACKDOORED, CollapseContrastRule, ContrastRule, verdict_of
from lit_amdet.io import read_json, write_json
from lit_amdet.metrics import classification_metrics

#: bands of drift reached (clean pooled cosine to the base), [low, high)
BANDS = [(0.95, 1.01), (0.9, 0.95), (0.85, 0.9), (0.7, 0.85), (0.6, 0.7), (0.5, 0.6), (0.0, 0.5)]
KEYS = ("clean_anchor_pooled_cos", "unshared_collapse", "pooled_unshared_collapse", "collapse_lift",
        "pooled_collapse_lift", "divergence_ratio", "pooled_divergence_ratio")


def benchmark_table(scans: Path, out: str) -> None:
    """Per drift level of a benchmark run's scanned members: both rules' verdict counts and F1."""
    new, old = CollapseContrastRule(), ContrastRule()
    rows = []
    for record in sorted(scans.glob("*.json")):
        row = member_row(read_json(record, "scan record"))
        row["old_verdict"] = verdict_of(old.decide(row["scores"]))
        row["new_verdict"] = verdict_of(new.decide(row["scores"]))
        rows.append(row)
    write_json(out, {"rules": {"old": old.describe(), "new": new.describe()},
                     "members": [{k: r.get(k) for k in ("name", "split", "backdoored", "attack", "drift_target",
                                                        "drift_mode", "trigger_kind", "working",
                                                        "clean_cosine_to_base", "verdict", "old_verdict",
                                                        "new_verdict", "scores", "seconds")} for r in rows]})
    print("| members | benign / backdoored (working) | drift reached | old: F1, flagged benign, missed | "
          "new: F1, flagged benign, missed, inconclusive benign / backdoored |")
    print("|---|---|---|---|---|")
    for band in [None, *BANDS]:
        members = [r for r in rows if (r["drift_target"] is None) == (band is None)
                   and (band is None or band[0] <= r["clean_cosine_to_base"] < band[1])]
        group = [r for r in members if not r["backdoored"] or r["working"]]
        if not group:
            continue
        truth = [r["backdoored"] for r in group]
        drift = sorted(r["clean_cosine_to_base"] for r in group)
        cells = []
        for key in ("old_verdict", "new_verdict"):
            flags = [r[key] == BACKDOORED for r in group]
            f1 = classification_metrics(truth, flags)["f1"]
            fp = sum(f and not t for f, t in zip(flags, truth))
            missed = sum(t and not f for f, t in zip(flags, truth))
            cell = f"{f1:.2f}, {fp}, {missed}"
            if key == "new_verdict":
                unjudged = [r["backdoored"] for r in group if r[key] == "inconclusive"]
                cell += f", {unjudged.count(False)} / {unjudged.count(True)}"
            cells.append(cell)
        working = sum(truth)
        failed = sum(1 for r in members if r["backdoored"] and not r["working"])
        print(f"| {'grid (calibration + test)' if band is None else f'sweep, drift {band[0]:g}–{band[1]:g}'} | "
              f"{len(group) - working} / {working} (+{failed} failed) | {drift[0]:.3f}–{drift[-1]:.3f} | "
              + " | ".join(cells) + " |")
    for r in rows:
        if r["old_verdict"] != r["new_verdict"]:
            s = r["scores"]
            print(f"- {r['name']} ({'backdoored' if r['backdoored'] else 'benign'}, drift "
                  f"{r['clean_cosine_to_base']:.3f}): old {r['old_verdict']}, new {r['new_verdict']}; "
                  + ", ".join(f"{k} {s[k]:.3f}" for k in KEYS if isinstance(s.get(k), float)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", help="results JSON files of drift_probe.py, later ones win")
    parser.add_argument("--scans", type=Path, help="a lit-amdet benchmark run's scans/ folder instead")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.scans is not None:
        benchmark_table(args.scans, args.out)
        return
    if not args.results:
        parser.error("give drift_probe.py results files or --scans")
    rows: dict[str, dict] = {}
    for path in args.results:
        run = read_json(path, "drift_probe results")
        for m in run["models"]:
            rows[m["name"]] = {**m, "run": path, "scan_overrides": run.get("scan_overrides")}
    new, old = CollapseContrastRule(), ContrastRule()
    for r in rows.values():
        r["old_verdict"] = verdict_of(old.decide(r["scores"]))
        decision = new.decide(r["scores"])
        r["new_verdict"], r["new_decided_by"] = verdict_of(decision), decision["decided_by"]
    write_json(args.out, {"rules": {"old": old.describe(), "new": new.describe()}, "models": list(rows.values())})
    print("| model | truth | drift (probe / scan) | attack top-1 | old rule | new rule | said | "
          + " | ".join(KEYS[1:]) + " |")
    print("|---" * (7 + len(KEYS) - 1) + "|")
    for r in rows.values():
        s = r["scores"]
        top1 = r.get("attack_top1")
        print(f"| {r['name']} | {'backdoored' if r['backdoored'] else 'benign'} | "
              f"{r['clean_cosine_to_base']:.3f} / {s['clean_anchor_pooled_cos']:.3f} | "
              f"{'–' if top1 is None else f'{top1:.2f}'} | {r['old_verdict']} | {r['new_verdict']} | {r['said']} | "
              + " | ".join(f"{s[k]:.3f}" if isinstance(s.get(k), float) else "–" for k in KEYS[1:]) + " |")


if __name__ == "__main__":
    main()
