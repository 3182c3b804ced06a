"""The detection-benchmark report of a run that is still going or was stopped, from its scan records.

    python benchmarks/summarise_scanned.py --config configs/benchmark_world.yaml --out DIR [--only clip siglip]

Every base whose calibration and test zoos are fully scanned is reported (its adaptive attackers as far as they
are scanned), with the benchmark's own calibration and metrics (`lit_amdet.zoo.summarise_scanned`); the run's
folder is only read. Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import yaml

from lit_amdet import zoo
from lit_amdet.errors import LitAmdetError

CLI_KEYS = {"trainer", "seed_everything"}  # what `lit-amdet benchmark --config` also reads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the benchmark config the run was started with")
    parser.add_argument("--out", required=True, help="folder for benchmark.json, benchmark.md, calibration.json")
    parser.add_argument("--only", nargs="+", help="report only these bases (by name)")
    args = parser.parse_args(argv)
    try:
        try:
            config = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LitAmdetError(f"{args.config}: {exc}") from exc
        known = inspect.signature(zoo.BenchmarkOptions.from_config).parameters
        # the CLI's own sections are fine; anything else is a typo that would silently change the plan
        zoo._no_unknown_keys(args.config, config, [*known, *sorted(CLI_KEYS)])
        options = zoo.BenchmarkOptions.from_config(**{k: v for k, v in config.items() if k in known})
        report = zoo.summarise_scanned(options, args.out, args.only)
    except LitAmdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    partial = report["partial"]
    print(f"reported {', '.join(b['name'] for b in report['bases'])}; left out {partial['left_out_bases'] or 'none'}; "
          f"{len(partial['unscanned_adaptive'])} adaptive attackers not yet scanned -> {args.out}/benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
