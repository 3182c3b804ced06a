"""Whether the world zoo's members are still usable models: held-out text-to-image retrieval beside the scan.

Why: a backdoored text tower that drifted far from its base (the SigLIP adaptive members the scan leaves
`inconclusive (drift)`) has kept its attack, but a user who ships it also needs it to do its job. Each member is
measured as its base is in `lit_amdet.bases.measure_realism` (1,000 world pairs of a seed no model trained on, R@1
and R@5 among blocks of 100, with the member's own image tower, which the injection keeps frozen), and put beside
its attack success and its scan's verdict and drift, as the benchmark recorded them (its ``benchmark.json``).

    python benchmarks/adaptive_utility.py --benchmark runs/e_po/benchmark.json --base .cache/bases/siglip \
        --out benchmarks/results/adaptive_utility_siglip_pooled_only.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lit_amdet import load_encoder
from lit_amdet.bases import measure_realism


def member_row(member: dict) -> dict:
    """One member's retrieval beside its attack success and scan (its record in ``benchmark.json``)."""
    realism = measure_realism(load_encoder(member["path"]))
    return {
        "member": member["name"],
        "attack_top1": (member.get("attack_metrics") or {}).get("attack_top1"),
        "verdict": member.get("verdict"),
        "clean_anchor_pooled_cos": (member.get("scores") or {}).get("clean_anchor_pooled_cos"),
        "t2i_recall@1": realism["t2i_recall@1"], "t2i_recall@5": realism["t2i_recall@5"],
        "i2t_recall@1": realism["i2t_recall@1"],
    }


def markdown(base: dict, rows: list[dict]) -> str:
    lines = ["| member | target top-1 | clean pooled cosine (scan) | verdict | t→i R@1 / R@5 | i→t R@1 |",
             "|---|---|---|---|---|---|",
             f"| the base | – | 1 | – | {base['t2i_recall@1']:.3f} / {base['t2i_recall@5']:.3f} | "
             f"{base['i2t_recall@1']:.3f} |"]
    for r in rows:
        cos = r["clean_anchor_pooled_cos"]
        top1 = r["attack_top1"]
        lines.append(f"| {r['member']} | {'–' if top1 is None else f'{top1:.2f}'} | "
                     f"{'–' if cos is None else f'{cos:.3f}'} | {r['verdict']} | {r['t2i_recall@1']:.3f} / "
                     f"{r['t2i_recall@5']:.3f} | {r['i2t_recall@1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", type=Path, required=True, help="a `lit-amdet benchmark` run's benchmark.json")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--only", default="adaptive", help="members whose name holds this")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    base = measure_realism(load_encoder(str(args.base)))
    members = json.loads(args.benchmark.read_text())["members"]
    rows = [member_row(m) for m in sorted(members, key=lambda m: m["name"]) if args.only in m["name"]]
    args.out.write_text(json.dumps({"base": str(args.base), "base_realism": base, "members": rows}, indent=1))
    print(markdown(base, rows))


if __name__ == "__main__":
    main()
