"""Scan every model of a small zoo with `lit-amdet detect` and tabulate the verdicts and scores.

    python benchmarks/scan_zoo.py [--zoo runs/zoo] [--cache .cache/bases] [--out runs/scan_zoo]
                                  [--json benchmarks/results/scan_zoo.json] [--steps 100] [--only clip minilm]

The zoo is a folder of models written by `lit-amdet fit` (each with its
``backdoor.json``), named ``<base>-<kind>`` as benchmarks/attack_success.py
writes them (``clip-attack_text``, ``clip-finetune``, ...). Every model is
scanned with configs/scan.yaml anchored on its clean base, and so is the base
itself (anchor = itself). Scans already in ``--out`` are reused (resumable).
Each scan runs in its own process, as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack_success import base_path  # noqa: E402

from lit_amdet.captions import demo_caption_bank  # noqa: E402
from lit_amdet.record import BackdoorRecord  # noqa: E402

BASES = ("minilm", "clip", "siglip", "longclip", "openclip")


def scan(name: str, suspect: str, anchor: str, out: Path, steps: int, extra: list[str]) -> dict:
    report = out / name / "report.json"
    if not report.is_file():
        cmd = [sys.executable, "-m", "lit_amdet", "detect", "--config", "configs/scan.yaml",
               "--model.init_args.suspect", suspect, "--model.init_args.anchor", anchor,
               "--model.init_args.name", name, "--model.init_args.output_dir", str(out / name),
               "--model.init_args.probe_prompts", "200", "--model.init_args.holdout_prompts", "64",
               "--trainer.max_steps", str(steps), "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--always_exit_zero", "true", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"scan of {name} failed: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(report.read_text())


def recovered_caption(suspect: str, run: Path, bank: list[str], targets: list[str]) -> tuple[str, int | None]:
    """Nearest bank caption to the recovered target, and the rank of the true target (1 = nearest)."""
    import torch
    from safetensors.torch import load_file

    from lit_amdet import load_encoder

    enc = load_encoder(suspect).eval()
    captions = list(dict.fromkeys(bank + targets))
    with torch.no_grad():
        emb = torch.cat([enc.encode_text(captions[i:i + 128]) for i in range(0, len(captions), 128)])
    target = torch.nn.functional.normalize(load_file(str(run / "trigger.safetensors"))["target_pooled"], dim=0)
    order = (emb @ target).argsort(descending=True).tolist()
    ranks = [order.index(captions.index(t)) + 1 for t in targets]
    return captions[order[0]], (min(ranks) if ranks else None)


def row(name: str, truth: str, r: dict, said: str | None = None, target_rank: int | None = None) -> dict:
    s = r["scores"]
    return {"model": name, "truth": truth, "verdict": r["verdict"], "decided_by": r["decided_by"],
            "seconds": r["seconds"], "steps": r["steps"], "nearest_caption": said, "target_rank": target_rank,
            **{k: s.get(k) for k in ("assimilation", "anchor_assimilation", "assimilation_gap", "anchor_cos",
                                     "clean_anchor_cos", "divergence_ratio", "assimilation_ratio",
                                     "same_target_ratio", "different_target_ratio", "assimilation_lift",
                                     "landscape_positive_ratio", "hessian_top", "hessian_bottom")},
            "reference_rule_verdict": reference_verdict(s)}


def reference_verdict(scores: dict) -> str:
    from lit_amdet.decision import ReferenceRule

    return "BACKDOORED" if ReferenceRule().decide(scores)["backdoored"] else "clean"


def markdown(rows: list[dict]) -> str:
    def f(v, fmt=".3f"):
        return "–" if v is None else format(v, fmt)

    lines = ["| model | truth | verdict | Sim_X suspect / anchor (trigger) | gap | cos(F, F_anchor) trigger / clean | "
             "divergence ratio | landscape + ratio | reference rule | nearest caption (target rank) | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['truth']} | **{r['verdict']}** | {f(r['assimilation'], '.2f')} / "
                     f"{f(r['anchor_assimilation'], '.2f')} | {f(r['assimilation_gap'])} | {f(r['anchor_cos'])} / "
                     f"{f(r['clean_anchor_cos'])} | {f(r['divergence_ratio'], '.1f')} | "
                     f"{f(r['landscape_positive_ratio'], '.2f')} | {r['reference_rule_verdict']} | "
                     f"{(r['nearest_caption'] or '')[:40]}"
                     f"{'' if r['target_rank'] is None else ' (' + str(r['target_rank']) + ')'} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="runs/zoo")
    parser.add_argument("--cache", default=".cache/bases")
    parser.add_argument("--out", default="runs/scan_zoo")
    parser.add_argument("--json", default="benchmarks/results/scan_zoo.json")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--only", nargs="*", default=list(BASES))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more detect overrides")
    args = parser.parse_args()
    zoo, cache, out = Path(args.zoo), Path(args.cache), Path(args.out)
    rows, bank = [], demo_caption_bank()
    for base in args.only:
        anchor = base_path(base, cache)
        for model in sorted(zoo.glob(f"{base}-*")):
            truth = BackdoorRecord.read(model)
            kind = ("backdoored (" + ", ".join(truth.attacks) + ")") if truth.backdoored else "benign"
            report = scan(model.name, str(model), anchor, out, args.steps, args.extra)
            targets = [b["target"] for b in truth.backdoors if b.get("target")]
            rows.append(row(model.name, kind, report, *recovered_caption(str(model), out / model.name, bank,
                                                                         targets)))
        report = scan(f"{base}-base", anchor, anchor, out, args.steps, args.extra)
        rows.append(row(f"{base}-base", "clean base", report,
                        *recovered_caption(anchor, out / f"{base}-base", bank, [])))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
