"""``make demo``: backdoor a real pretrained encoder, fine-tune it benignly, and scan both.

The embedded default is all-MiniLM-L6-v2 (a real pretrained sentence encoder
shipped in a PyPI package) and the built-in world's captions: no download, no
``../shared``. Step by step, each through the ``lit-amdet`` command line:

1. ``lit-amdet fit --config configs/attack_text.yaml``: a text-on-text backdoor
   (trigger "zzzz" replacing an "o", target "a white teapot");
2. ``lit-amdet fit --config configs/finetune.yaml``: a benign SimCSE fine-tune;
3. ``lit-amdet detect --config configs/scan.yaml`` on both, anchored on the
   clean MiniLM: one verdict line each.

Models are cached in ``.cache/demo`` (reused when their ``backdoor.json`` is
there); scan reports go to ``runs/demo``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lit_amdet.captions import demo_caption_bank
from lit_amdet.cli import main as cli
from lit_amdet.record import BackdoorRecord
from lit_amdet.resources import config_path

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false"]

def build_backdoored(out: Path, encoder: str, steps: int) -> float:
    if BackdoorRecord.exists(out):
        return 0.0
    t0 = time.perf_counter()
    cli(["fit", "--config", str(config_path("attack_text.yaml")), "--model.init_args.encoder", encoder,
         "--model.init_args.output_dir", str(out), "--model.init_args.lr", "5e-4",
         "--model.init_args.milestones", f"[{int(steps * 0.75)}]", "--model.init_args.poisoned_batch_size", "16",
         "--model.init_args.max_length", "24", "--data.init_args.batch_size", "32",
         "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
         "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
         "--trainer.default_root_dir", str(out.parent / "runs"), *QUIET])
    return time.perf_counter() - t0


def build_benign(out: Path, encoder: str, steps: int) -> float:
    if BackdoorRecord.exists(out):
        return 0.0
    t0 = time.perf_counter()
    cli(["fit", "--config", str(config_path("finetune.yaml")), "--model.init_args.encoder", encoder,
         "--model.init_args.output_dir", str(out), "--model.init_args.objective", "simcse",
         "--model.init_args.lr", "2e-5", "--model.init_args.warmup_steps", "5",
         "--data.init_args.views", "2", "--data.init_args.with_images", "false", "--data.init_args.max_length", "24",
         "--data.init_args.batch_size", "32", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
         "--trainer.default_root_dir", str(out.parent / "runs"), *QUIET])
    return time.perf_counter() - t0


def scan(suspect: Path, anchor: str, out: Path, bank: Path, steps: int | None = None,
         extra: list[str] | None = None) -> dict:
    """``detect`` with the shipped scan config (``steps``: another step limit than the shipped one)."""
    limit = [] if steps is None else ["--trainer.max_steps", str(steps)]
    cli(["detect", "--config", str(config_path("scan.yaml")), "--model.init_args.suspect", str(suspect),
         "--model.init_args.anchor", anchor, "--model.init_args.output_dir", str(out),
         "--model.init_args.caption_bank", str(bank), *limit,
         "--trainer.default_root_dir", str(out.parent), "--always_exit_zero", "true", *QUIET, *(extra or [])])
    return json.loads((out / "report.json").read_text())


def run(encoder: str = "minilm", cache: Path = Path(".cache/demo"), runs: Path = Path("runs/demo"),
        attack_steps: int = 50, benign_steps: int = 30, scan_steps: int | None = None,
        scan_extra: list[str] | None = None) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    backdoored, benign = cache / f"{encoder}-backdoored", cache / f"{encoder}-benign"
    seconds = {"build_backdoored": build_backdoored(backdoored, encoder, attack_steps),
               "build_benign": build_benign(benign, encoder, benign_steps)}
    bank = runs / "caption_bank.txt"
    # candidate captions: held-out world captions (a seed no model trained on) and everyday concepts
    bank.write_text("\n".join(demo_caption_bank()) + "\n")
    reports = {}
    for label, path in (("backdoored", backdoored), ("benign", benign)):
        t0 = time.perf_counter()
        reports[label] = scan(path, encoder, runs / path.name, bank, scan_steps, scan_extra)
        seconds[f"scan_{label}"] = time.perf_counter() - t0
    return {"reports": reports, "seconds": seconds,
            "truth": {k: BackdoorRecord.read(p).to_dict() for k, p in
                      (("backdoored", backdoored), ("benign", benign))}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="minilm", help="a pretrained base: built-in name or checkpoint folder")
    parser.add_argument("--cache", default=".cache/demo")
    parser.add_argument("--runs", default="runs/demo")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args.encoder, Path(args.cache), Path(args.runs))
    print()
    for label in ("backdoored", "benign"):
        r = res["reports"][label]
        truth = res["truth"][label]
        said = r["nearest_captions"][0]["caption"] if r["nearest_captions"] else "-"
        what = f"backdoored, target {truth['backdoors'][0]['target']!r}" if truth["backdoored"] else "benign"
        print(f"[{label} model, truth: {what}] decided by {r['decided_by']}; "
              f"with the recovered trigger it says {said!r}")
    for label in ("backdoored", "benign"):
        r = res["reports"][label]
        print(f"{r['model']}: {r['verdict']}")
    print(f"({time.perf_counter() - t0:.0f} s; reports in {args.runs})")


if __name__ == "__main__":
    main()
