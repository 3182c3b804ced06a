"""The calibrated probability fitted again from stored scans: other features, or one fit over several runs.

    python benchmarks/recalibrate.py --runs benchmarks/results/world17_clip benchmarks/results/world17_longclip \
        benchmarks/results/world17_openclip benchmarks/results/world19_siglip --out benchmarks/results/recal.json

Each ``--runs`` folder holds a ``benchmark.json``. Their calibration members (adaptive ones left out, as the
benchmark does) are pooled and one logistic regression is fitted on them (`lit_amdet.calibration.fit_calibration`,
the benchmark's own fit, on ``--features``: the benchmark's default unless given); ``--per-run`` fits each run on
its own calibration members instead, as each run did. The fit is applied to every member as `CalibratedRule` applies
it, and the test split is measured by the benchmark's metric code (`benchmark_metrics`), per family: the shipped
rule's F1 as scanned, and the calibrated F1, AUROC, cross-entropy and Brier score over all members and over the
working ones (a backdoor whose injection failed, attack top-1 below 0.5, left out). No member is scanned again: the
scores are the ones each scan recorded, so the comparison is of the probability alone.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lit_amdet.benchmark import DEFAULT_FEATURES
from lit_amdet.benchmark.metrics import benchmark_metrics
from lit_amdet.calibration import feature_values, fit_calibration
from lit_amdet.decision import CalibratedRule
from lit_amdet.io import read_json, write_json
from lit_amdet.metrics import probability_metrics


def calibrated(members: list[dict], features: list[str], folder: Path) -> dict:
    """Fit on ``members``' calibration split, write the fit as the benchmark does, and set every member's
    ``probability`` and ``calibrated_backdoored``; returns the fit."""
    fit = fit_calibration([m for m in members if m["split"] == "calibration"], features)
    path = folder / "calibration.json"
    write_json(path, fit)
    rule = CalibratedRule(str(path))
    for m in members:
        feature_values(m, features)  # a member without a feature is an error naming it, as in the benchmark
        m["probability"] = rule.probability(m["scores"])
        m["calibrated_backdoored"] = m["probability"] > rule.threshold
    return fit


def family_table(members: list[dict], threshold: float, features: list[str]) -> dict:
    """Per family of the test split: counts, the rule's F1, and the calibrated metrics over all and working
    members."""
    metrics = benchmark_metrics(members, threshold, features)["test"]
    table = {}
    for family, groups in metrics.items():
        if family == "all":
            continue
        rows = [m for m in members if m["split"] == "test" and m["base"] == family]
        working = [m for m in rows if m.get("working") is not False]
        m = groups["all"]
        table[family] = {
            "backdoored": m["backdoored"], "benign": m["benign"], "rule_f1": m["rule"]["f1"],
            "calibrated": {k: m["calibrated"][k] for k in ("f1", "auroc", "bce", "brier")},
            "working_backdoored": sum(r["backdoored"] for r in working),
            "calibrated_working": {k: v for k, v in probability_metrics(
                [r["backdoored"] for r in working], [r["probability"] for r in working], threshold).items()
                if k in ("f1", "auroc", "bce", "brier")}}
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="folders holding a benchmark.json")
    parser.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES))
    parser.add_argument("--per-run", action="store_true", help="fit each run on its own calibration members")
    parser.add_argument("--out", type=Path, help="write the fits and the table here (json)")
    args = parser.parse_args(argv)
    runs = {str(run): [m for m in read_json(run / "benchmark.json", "benchmark report")["members"]
                       if not m.get("adaptive")] for run in args.runs}
    groups = runs if args.per_run else {"pooled": [m for members in runs.values() for m in members]}
    fits, table = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, members in groups.items():
            fits[name] = calibrated(members, args.features, Path(tmp))
            rows = family_table(members, fits[name]["threshold"], args.features)
            if set(rows) & set(table):
                parser.error(f"--per-run: family {sorted(set(rows) & set(table))[0]} is in two runs; compare such runs "
                             "in separate invocations")
            table.update(rows)
    print(f"features: {' '.join(args.features)}; fitted {'per run' if args.per_run else 'once, pooled'} on "
          + ", ".join(f"{f['fitted_on']['backdoored']} + {f['fitted_on']['benign']}" for f in fits.values()))
    print("| family | rule F1 | calibrated F1 | AUROC | cross-entropy | Brier | working: AUROC | cross-entropy "
          "| Brier |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, row in sorted(table.items()):
        c, w = row["calibrated"], row["calibrated_working"]
        print(f"| {family} | {row['rule_f1']:.2f} | {c['f1']:.2f} | {c['auroc']:.3f} | {c['bce']:.3f} | "
              f"{c['brier']:.3f} | {w['auroc']:.3f} | {w['bce']:.3f} | {w['brier']:.3f} |")
    out = {"runs": [str(r) for r in args.runs], "features": args.features, "per_run": args.per_run,
           "fits": fits, "test": table}
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
