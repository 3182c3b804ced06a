"""Rebuild and rescan a few members of the quick benchmark with the current code, and compare them with the
committed results.

    python benchmarks/reproduce_quick.py --members minilm-test-backdoored-000 minilm-test-benign-000 \\
        [--config configs/benchmark_quick.yaml] [--out runs/reproduce_quick] \\
        [--reference benchmarks/results/benchmark_quick/benchmark.json] [--dry-run]

Each named member of the config's plan is built into ``<out>/zoo`` and scanned into ``<out>/scans`` exactly as
``lit-amdet benchmark`` does it (`lit_amdet.benchmark.build_member` and `scan_member`, the same caption bank,
`lit_amdet.commands.detect`). Then, per member, its verdict and every numeric score of report.json's ``scores``
are compared with the reference's ``members`` entry: a table of the largest absolute differences. Exit 1 if a
verdict differs, 2 on bad input. ``--dry-run`` only prints the planned members it would build.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from jsonargparse import ArgumentError

from lit_amdet.benchmark import build_member, full_plan, load_options, resolve_bases, scan_member, zoo_entry
from lit_amdet.captions import world_caption_bank
from lit_amdet.errors import ConfigError, LitAmdetError
from lit_amdet.io import read_json, write_json, write_text


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare(name: str, reference: dict, scores: dict, verdict: str) -> dict:
    """Verdicts and the largest absolute difference over the numeric scores both have."""
    worst, worst_key, missing = 0.0, None, []
    for key, ref in reference["scores"].items():
        if not numeric(ref):
            continue
        new = scores.get(key)
        if not numeric(new):
            missing.append(key)
            continue
        diff = abs(new - ref) if not (math.isnan(new) and math.isnan(ref)) else 0.0
        if math.isnan(diff) or diff > worst:
            worst, worst_key = (math.inf if math.isnan(diff) else diff), key
    return {"name": name, "reference_verdict": reference["verdict"], "verdict": verdict,
            "same_verdict": reference["verdict"] == verdict, "max_abs_diff": worst, "worst_score": worst_key,
            "missing": missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="+", required=True, help="member names of the config's plan")
    parser.add_argument("--config", default="configs/benchmark_quick.yaml")
    parser.add_argument("--out", default="runs/reproduce_quick", help="work folder (zoo/, scans/)")
    parser.add_argument("--reference", default="benchmarks/results/benchmark_quick/benchmark.json")
    parser.add_argument("--dry-run", action="store_true", help="print the planned members and stop")
    parser.add_argument("--results", default=None, help="also write the comparison here as JSON")
    args = parser.parse_args(argv)
    try:
        options = load_options(args.config)
        bases = resolve_bases(options.bases)
        plan = full_plan(options, bases)
        by_name = {m.name: m for m in plan}
        unknown = [n for n in args.members if n not in by_name]
        if unknown:
            raise ConfigError(f"not in the plan of {args.config}: {', '.join(unknown)} "
                              f"(planned: {', '.join(by_name)})")
        chosen = [by_name[n] for n in args.members]
        if args.dry_run:
            for m in chosen:
                print(m.describe())
            return 0
        reference = {m["name"]: m for m in read_json(args.reference, "benchmark report")["members"]}
        missing = [n for n in args.members if n not in reference]
        if missing:
            raise ConfigError(f"{args.reference} has no member {missing[0]}")
        from lit_amdet.commands import detect

        out = Path(args.out)
        bank = out / "caption_bank.txt"  # the benchmark's bank: every planned member's target caption
        write_text(bank, "\n".join(world_caption_bank([getattr(m, "target_caption", None) for m in plan],
                                                      options.scan.bank_captions)) + "\n")
        base_of = {b.name: b for b in bases}
        rows = []
        for m in chosen:
            path = build_member(m, base_of[m.base], out / "zoo", options.train)
            record = scan_member(zoo_entry(path, bases), base_of[m.base], out, options.scan, bank, detect=detect)
            report = read_json(record["report"], "scan report")
            rows.append(compare(m.name, reference[m.name], report["scores"], report["verdict"]))
    except (LitAmdetError, ArgumentError) as exc:
        print(f"{Path(__file__).name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.results:
        write_json(args.results, {"config": args.config, "reference": args.reference, "members": rows})
    print("| member | verdict (reference -> now) | max abs score difference | at score | missing scores |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = "" if r["same_verdict"] else " DIFFERS"
        print(f"| {r['name']} | {r['reference_verdict']} -> {r['verdict']}{mark} | {r['max_abs_diff']:.3g} | "
              f"{r['worst_score'] or '-'} | {', '.join(r['missing']) or '-'} |")
    return 0 if all(r["same_verdict"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
