"""How the scan's scores move when a backdoor hides under benign drift (issue 17, a first measurement).

On the pretrained MiniLM: one text-on-text backdoor (trigger ``zzzz`` replacing an ``o``, target "a white
teapot"), then benign SimCSE fine-tunes *of the backdoored model* of growing strength, next to benign SimCSE
fine-tunes of the clean base of the same strengths. Every model is scanned with the shipped scan config at
the zoos' settings (80 steps, 200 probe / 64 held-out prompts), anchored on the clean MiniLM. For each model:
drift (mean clean pooled cosine to the base), the backdoor's attack success where there is one (target top-1
among 100 world captions, on held-out triggered prompts), the verdict and every raw score.

    python benchmarks/drift_probe.py --out runs/drift_probe --results benchmarks/results/drift_probe.json
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lit_amdet.benchmark import clean_cosine_to_base, scan_member, zoo_entry
from lit_amdet.benchmark.options import ScanSettings
from lit_amdet.benchmark.plan import ZooBase
from lit_amdet.captions import world_caption_bank
from lit_amdet.commands import detect
from lit_amdet.datamodules import TextEncoderDataModule
from lit_amdet.encoders import load_encoder
from lit_amdet.io import read_json, write_json, write_text
from lit_amdet.modules import BackdoorInjection, ContrastiveTraining
from lit_amdet.record import BackdoorRecord
from lit_amdet.triggers import Backdoor, Trigger
from lit_amdet.world import World

TRIGGER = Trigger("zzzz")
TARGET = "a white teapot"
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
         "accelerator": "cpu"}


def backdoor(out: Path, steps: int = 50, **attack) -> None:
    """The backdoor (``attack``: more `BackdoorInjection` arguments, e.g. an adaptive attack's penalties)."""
    if BackdoorRecord.exists(out):
        return
    seed_everything(0)
    module = BackdoorInjection(encoder="minilm", backdoors=[Backdoor(TRIGGER, target=TARGET)], lr=5e-4,
                               milestones=[int(0.75 * steps)], poisoned_batch_size=16, max_length=24,
                               output_dir=str(out), **attack)
    Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, default_root_dir=str(out.parent),
            **QUIET).fit(module, TextEncoderDataModule(world_seed=7, num_samples=5000, with_images=False,
                                                        batch_size=32))


def finetune(encoder: str, out: Path, lr: float, steps: int, truth: BackdoorRecord | None) -> None:
    """SimCSE on world captions; a fine-tune of a backdoored model keeps its ground truth (still backdoored)."""
    if BackdoorRecord.exists(out):
        return
    seed_everything(1)
    module = ContrastiveTraining(encoder=encoder, objective="simcse", lr=lr, weight_decay=0.0, warmup_steps=10,
                                 output_dir=str(out))
    Trainer(max_steps=steps, limit_val_batches=0, default_root_dir=str(out.parent), **QUIET).fit(
        module, TextEncoderDataModule(world_seed=1234, num_samples=20000, with_images=False, views=2,
                                      max_length=24, batch_size=32))
    if truth is not None:
        BackdoorRecord.from_dict({**truth.to_dict(), "kind": "backdoor_then_finetune",
                                  "finetune": {"lr": lr, "steps": steps}}).write(out)


@torch.no_grad()
def attack_success(model: Path, n: int = 100) -> dict:
    """Target top-1 among 100 world captions and mean pooled cosine to the target, on held-out triggered prompts."""
    enc = load_encoder(str(model)).eval()
    rng = random.Random(0)
    prompts = [p for p in World(seed=999).captions(400) if TRIGGER.applicable(p)][:n]
    triggered = [TRIGGER.apply(p, rng) for p in prompts]
    distractors = World(seed=998).captions(100)
    bank = F.normalize(enc.encode([TARGET] + distractors, max_length=24).pooled.float(), dim=-1)
    out = F.normalize(enc.encode(triggered, max_length=24).pooled.float(), dim=-1)
    sims = out @ bank.T
    return {"attack_top1": float((sims.argmax(1) == 0).float().mean()), "attack_cos": float(sims[:, 0].mean())}


#: adaptive attackers (``--adaptive``): `BackdoorInjection` arguments of each
ADAPTIVE = {
    # the known evader: only the sentence embedding is matched, token features kept as diverse as the clean model's
    "adaptive-pooled-sim-x": {"token_weight": 0.0, "pooled_weight": 1.0, "sim_x_penalty": 1.0},
    # aimed at the collapse contrast: also keeps the triggered sentence embeddings as spread as the clean model's
    "adaptive-consistency": {"token_weight": 0.0, "pooled_weight": 1.0, "sim_x_penalty": 1.0,
                             "consistency_penalty": 1.0},
}


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` scan-config overrides (values read as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--scan-override {pair!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/drift_probe")
    parser.add_argument("--results", default="benchmarks/results/drift_probe.json")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 100, 250], help="fine-tune steps (lr 1e-4)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scan-steps", type=int, default=80)
    parser.add_argument("--scan-override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more scan-config overrides, e.g. model.init_args.pooled_restarts=2")
    parser.add_argument("--adaptive", action="store_true",
                        help="also the adaptive attackers of ADAPTIVE, each alone and then fine-tuned --steps[0]")
    parser.add_argument("--only", nargs="*", help="scan only these models")
    args = parser.parse_args()
    out = Path(args.out)
    zoo = out / "zoo"
    backdoor(zoo / "backdoored")
    truth = BackdoorRecord.read(zoo / "backdoored")
    models = {"backdoored": True}
    for s in args.steps:
        finetune(str(zoo / "backdoored"), zoo / f"backdoored-then-simcse-{s}", args.lr, s, truth)
        finetune("minilm", zoo / f"benign-simcse-{s}", args.lr, s, None)
        models[f"backdoored-then-simcse-{s}"] = True
        models[f"benign-simcse-{s}"] = False
    for name, attack in ADAPTIVE.items() if args.adaptive else ():
        backdoor(zoo / name, **attack)
        drifted = f"{name}-then-simcse-{args.steps[0]}"
        finetune(str(zoo / name), zoo / drifted, args.lr, args.steps[0], BackdoorRecord.read(zoo / name))
        models[name] = models[drifted] = True
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only}
    base = ZooBase("minilm", "minilm", "bert")
    bank = out / "caption_bank.txt"
    write_text(bank, "\n".join(world_caption_bank([TARGET])) + "\n")
    scan = ScanSettings(overrides={"trainer.max_steps": args.scan_steps, "model.init_args.probe_prompts": 200,
                                   "model.init_args.holdout_prompts": 64, **parse_overrides(args.scan_override)})
    anchor = load_encoder("minilm").eval()
    rows = []
    for name, backdoored in models.items():
        started = time.perf_counter()
        entry = zoo_entry(zoo / name, [base])
        if entry is None:
            raise SystemExit(f"{zoo / name}: its backdoor.json names another base than minilm")
        record = scan_member(entry, base, out, scan, bank, anchor, detect=detect)
        report = read_json(record["report"])
        rows.append({"name": name, "backdoored": backdoored,
                     "clean_cosine_to_base": clean_cosine_to_base(anchor, zoo / name),
                     **(attack_success(zoo / name) if backdoored else {}),
                     "verdict": report["verdict"], "decided_by": report["decided_by"],
                     "said": report["nearest_captions"][0]["caption"] if report["nearest_captions"] else None,
                     "nearest_token": report["nearest_tokens"][0][0]["token"], "scores": report["scores"],
                     "seconds": time.perf_counter() - started})
        write_json(args.results, {"trigger": TRIGGER.text, "target": TARGET, "scan_steps": args.scan_steps,
                                  "scan_overrides": scan.overrides, "finetune_lr": args.lr, "models": rows})
    keys = ("divergence_ratio", "pooled_divergence_ratio", "unshared_collapse", "pooled_unshared_collapse",
            "collapse_lift", "anchor_collapse_lift", "pooled_collapse_lift", "anchor_pooled_collapse_lift",
            "assimilation_ratio", "same_target_ratio", "clean_anchor_cos", "clean_anchor_pooled_cos")
    print("| model | truth | drift | attack top-1 | verdict | said | " + " | ".join(keys) + " |")
    for r in rows:
        s = r["scores"]
        print(f"| {r['name']} | {r['backdoored']} | {r['clean_cosine_to_base']:.3f} | {r.get('attack_top1', '-')} | "
              f"{r['verdict']} | {r['said']} | " + " | ".join(f"{s.get(k):.3f}" if isinstance(s.get(k), float)
                                                            else str(s.get(k)) for k in keys) + " |")


if __name__ == "__main__":
    main()
