"""The typed-token probe's typings in float32 and in bfloat16: how far the collapse scores move, and the seconds.

    python benchmarks/typing_precision.py --reports DIR [DIR ...] [--out benchmarks/results/typing_precision.json]

Why: a benign scan types up to 28 tokens and pairs into 32 held-out prompts through both encoders
(`lit_amdet.token_probe.probe_tokens`), about 7.6 s of a 49 s benign MiniLM scan. Typed in bfloat16 they take about
half that on a CPU with native bfloat16; the verdict reads their collapse scores against the rule's thresholds, so a
scan screens in bfloat16 and types again in float32 every typing whose scores come within
`lit_amdet.typed_verdict.SCREEN_MARGIN` of a typed path (`screened_near`). This script measures what that margin
must cover: every typing a scan made (read from its ``report.json``, under each ``--reports`` folder, recursively),
typed again here at both precisions into the shipped scan's held-out prompts, with the largest difference of each
score the rule reads, whether any typing's flag differs, and the seconds of each precision (back to back, the
untyped prompts once per precision, nothing cached).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lit_amdet.decision import CollapseContrastRule
from lit_amdet.encoders import load_encoder
from lit_amdet.io import read_json, write_json
from lit_amdet.resources import config_path
from lit_amdet.token_probe import pass_dtype, typing_collapse
from lit_amdet.typed_verdict import SCREEN_MARGIN, typed_flagged

sys.path.insert(0, str(Path(__file__).resolve().parent))
from typed_probe import held_out_tokens  # noqa: E402

CHECKED = ("unshared_collapse", "collapse_lift", "pooled_unshared_collapse", "pooled_collapse_lift")
PROMPTS = 32  # `probe_tokens`' default: the typings' prompts


def typed_all(suspect, anchor, tokens, typings: list[dict], dtype: torch.dtype) -> tuple[list[dict], float]:
    """Every typing's collapse scores at ``dtype`` (`typing_collapse`: against the untyped prompts at the same
    precision), and the seconds it took."""
    started, untyped = time.perf_counter(), {}
    out = [{"token": p["token"], "ids": p["ids"], "by": p.get("by"), "position": p.get("position", 1),
            **typing_collapse(suspect, anchor, tokens, p["ids"], p.get("position", 1), untyped, dtype)}
           for p in typings]
    return out, time.perf_counter() - started


def measure(report_path: Path, anchors: dict, rule: CollapseContrastRule) -> dict | None:
    report = read_json(report_path)
    typings = report.get("typed_probe") or []
    if not typings or not report.get("anchor_used"):
        return None
    suspect = load_encoder(report["suspect"]["path"]).eval()
    ref = report["anchor"]["path"]
    anchor = anchors.setdefault(ref, load_encoder(ref).eval())
    tokens = held_out_tokens(suspect, config_path("scan.yaml"))[0][:PROMPTS]
    full, full_s = typed_all(suspect, anchor, tokens, typings, torch.float32)
    half, half_s = typed_all(suspect, anchor, tokens, typings, torch.bfloat16)
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(full, half)) for k in CHECKED}
    flips = [a["token"] for a, b in zip(full, half) if typed_flagged([a], rule) != typed_flagged([b], rule)]
    return {"model": report["suspect"]["path"], "verdict": report.get("verdict"), "typings": len(typings),
            "max_difference": diffs, "flag_differs": flips,
            "flagged_float32": [a["token"] for a in full if typed_flagged([a], rule)],
            "seconds": {"float32": round(full_s, 2), "bfloat16": round(half_s, 2),
                        "speedup": round(full_s / half_s, 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", nargs="+", required=True, help="folders holding scans' report.json files")
    parser.add_argument("--out", default="benchmarks/results/typing_precision.json")
    args = parser.parse_args()
    if pass_dtype("cpu") != torch.bfloat16:
        print("note: this CPU has no native bfloat16; the seconds say how slow autocast is here")
    rule, anchors, rows = CollapseContrastRule(), {}, []
    for folder in args.reports:
        for path in sorted(Path(folder).rglob("report.json")):
            row = measure(path, anchors, rule)
            if row:
                rows.append(row)
                print(Path(row["model"]).name, row["max_difference"], row["flag_differs"], row["seconds"], flush=True)
    worst = {k: max(r["max_difference"][k] for r in rows) for k in CHECKED} if rows else {}
    write_json(Path(args.out), {"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                                "screen_margin": SCREEN_MARGIN, "worst_difference": worst,
                                "flags_differing": sum(len(r["flag_differs"]) for r in rows),
                                "typings": sum(r["typings"] for r in rows), "models": rows})
    print("worst", worst)


if __name__ == "__main__":
    main()
