"""The detection-benchmark report of a run that is still going or was stopped, from its scan records.

    python benchmarks/summarise_scanned.py --config configs/benchmark_world.yaml --out DIR [--only clip siglip]

Every base whose calibration and test zoos are fully scanned is reported (its adaptive attackers as far as they
are scanned), with the benchmark's own calibration and metrics (`lit_amdet.benchmark.summarise_scanned`); the
run's folder is only read. The config is read with jsonargparse on the benchmark's own option dataclasses
(`lit_amdet.benchmark.parse_options`): a typo is refused, never silently a changed plan. Exit 2 with one line
on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jsonargparse import ArgumentError

from lit_amdet.benchmark import load_options, summarise_scanned
from lit_amdet.errors import LitAmdetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the benchmark config the run was started with")
    parser.add_argument("--out", required=True, help="folder for benchmark.json, benchmark.md, calibration.json")
    parser.add_argument("--only", nargs="+", help="report only these bases (by name)")
    args = parser.parse_args(argv)
    try:
        options = load_options(args.config)
        report = summarise_scanned(options, args.out, args.only)
    except (LitAmdetError, ArgumentError) as exc:
        print(f"{Path(__file__).name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    partial = report["partial"]
    print(f"reported {', '.join(b['name'] for b in report['bases'])}; left out {partial['left_out_bases'] or 'none'}; "
          f"{len(partial['unscanned_adaptive'])} adaptive attackers not yet scanned -> {args.out}/benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
