"""Print the BENCHMARKS.md tables from the saved results.

    python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack_success import markdown as attack_markdown  # noqa: E402

from lit_amdet.bases import BASES, markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    # realism.json of each base, as copied into the results folder (the cache itself is not committed)
    files = [Path(args.results) / f"realism_{b}.json" for b in BASES]
    rows = [json.loads(f.read_text()) for f in files if f.is_file()]
    print(markdown_table(rows))
    attacks = []
    for name in ("clip", "siglip", "longclip", "openclip", "minilm"):
        f = Path(args.results) / f"attack_{name}.json"
        if f.is_file():
            attacks += json.loads(f.read_text())
    print(attack_markdown(attacks))


if __name__ == "__main__":
    main()
