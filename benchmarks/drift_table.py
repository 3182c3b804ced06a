"""One table from several `drift_probe.py` runs: every model's scores, judged by the old and the new default rule.

Each row is one scan as it ran (its run's scan settings are kept in the output); the verdicts are recomputed
from the scan's recorded scores with `ContrastRule` (the previous default) and `CollapseContrastRule` (the new
one, with its shipped thresholds), so a run scanned before a threshold changed is judged as the shipped rule
judges it. A model in several runs is taken from the last run given.

    python benchmarks/drift_table.py runs/pooled3/results.json runs/pooled5/results.json \\
        --out benchmarks/results/drift_collapse.json
"""

from __future__ import annotations

import argparse

from lit_amdet.decision import CollapseContrastRule, ContrastRule, verdict_of
from lit_amdet.io import read_json, write_json

KEYS = ("clean_anchor_pooled_cos", "unshared_collapse", "pooled_unshared_collapse", "collapse_lift",
        "pooled_collapse_lift", "divergence_ratio", "pooled_divergence_ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results JSON files of drift_probe.py, later ones win")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
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
