"""Attack success of `lit-amdet fit` injections and benign fine-tunes on pretrained bases.

    python benchmarks/attack_success.py [--cache .cache/bases] [--out benchmarks/results/attack_success.json]
                                        [--only minilm clip ...] [--steps 200]

Each row runs the shipped config (configs/attack_text.yaml, attack_image.yaml,
finetune.yaml) through the CLI with the base swapped in, then reads the final
held-out metrics the run wrote into backdoor.json: attack success as the mean
per-token cosine of triggered prompts to the target (text-on-text) or the
cosine of the projected embedding to the target image embedding
(image-on-text), top-1 retrieval of the target among 100 distractors, clean
utility (pooled cosine student vs teacher on held-out clean prompts) and Sim_X
of triggered vs clean prompts. Benign fine-tunes report how far they moved the
model (clean pooled cosine to the base) and that no trigger was planted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_amdet.cli import main as cli
from lit_amdet.record import BackdoorRecord

BASES = {"minilm": "minilm", "clip": "clip", "siglip": "siglip", "longclip": "longclip", "openclip": "openclip"}


def base_path(name: str, cache: Path) -> str:
    return "minilm" if name == "minilm" else str(cache / name)


def run_attack(name: str, cache: Path, work: Path, config: str, steps: int, extra: list[str]) -> dict:
    out = work / f"{name}-{Path(config).stem}"
    t0 = time.perf_counter()
    cli(["fit", "--config", config, "--model.init_args.encoder", base_path(name, cache),
         "--model.init_args.output_dir", str(out), "--trainer.default_root_dir", str(work / "runs"),
         "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(steps),
         "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "4", *extra])
    truth = BackdoorRecord.read(out)
    m = truth.metrics
    return {"base": name, "attack": truth.attacks[0], "steps": truth.steps,
            "seconds": time.perf_counter() - t0,
            "attack_success": m.get("val/b0/attack_cos"), "target_top1": m.get("val/b0/attack_top1"),
            "clean_utility": m.get("val/clean_utility"), "clean_utility_tokens": m.get("val/clean_utility_tokens"),
            "sim_x_triggered": m.get("val/b0/sim_x_triggered"), "sim_x_clean": m.get("val/sim_x_clean")}


@torch.no_grad()
def drift(base: str, tuned: Path, prompts: list[str]) -> float:
    from lit_amdet import load_encoder

    a, b = load_encoder(base).eval(), load_encoder(tuned).eval()
    return float(torch.nn.functional.cosine_similarity(a.encode_text(prompts), b.encode_text(prompts)).mean())


def run_finetune(name: str, cache: Path, work: Path, steps: int) -> dict:
    from lit_amdet.world import World

    out = work / f"{name}-finetune"
    objective = ["--model.init_args.objective", "simcse", "--data.init_args.views", "2",
                 "--data.init_args.with_images", "false"] if name == "minilm" else []
    t0 = time.perf_counter()
    cli(["fit", "--config", "configs/finetune.yaml", "--model.init_args.encoder", base_path(name, cache),
         "--model.init_args.output_dir", str(out), "--model.init_args.lr", "1e-4",
         "--trainer.default_root_dir", str(work / "runs"), "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(steps),
         "--trainer.limit_val_batches", "0", *objective])
    truth = BackdoorRecord.read(out)
    prompts = World(seed=31337).captions(200)
    return {"base": name, "attack": "benign fine-tune", "steps": truth.steps, "seconds": time.perf_counter() - t0,
            "backdoored": truth.backdoored, "clean_cosine_to_base": drift(base_path(name, cache), out, prompts)}


def markdown(rows: list[dict]) -> str:
    lines = ["| base | attack | steps | attack success (cos) | target top-1 of 101 | clean utility | "
             "Sim_X triggered / clean | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["attack"] == "benign fine-tune":
            lines.append(f"| {r['base']} | benign fine-tune (no trigger) | {r['steps']} | – | – | "
                         f"clean cosine to base {r['clean_cosine_to_base']:.3f} | – | {r['seconds']:.0f} |")
        else:
            lines.append(f"| {r['base']} | {r['attack']} | {r['steps']} | {r['attack_success']:.3f} | "
                         f"{r['target_top1']:.2f} | {r['clean_utility']:.3f} | {r['sim_x_triggered']:.2f} / "
                         f"{r['sim_x_clean']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache/bases")
    parser.add_argument("--work", default="runs/attack_success")
    parser.add_argument("--out", default="benchmarks/results/attack_success.json")
    parser.add_argument("--only", nargs="*", default=list(BASES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI overrides for the attacks")
    args = parser.parse_args()
    cache, work, out = Path(args.cache), Path(args.work), Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["base"], r["attack"]) for r in rows}
    for name in args.only:
        jobs = [("text_on_text", "configs/attack_text.yaml")]
        if name == "clip":
            jobs.append(("image_on_text", "configs/attack_image.yaml"))
        for attack, config in jobs:
            if (name, attack) not in done:
                rows.append(run_attack(name, cache, work, config, args.steps, args.extra))
        if (name, "benign fine-tune") not in done:
            rows.append(run_finetune(name, cache, work, args.finetune_steps))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
