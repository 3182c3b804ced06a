"""End to end: train a tiny CLIP on poisoned world data, then find the poisoned pairs with `lit-amdet scan-data`.

    python benchmarks/scan_data_world.py [--work .cache/scan_data_world] [--out benchmarks/results/scan_data_world.json]
                                         [--attacks badnets blend sig wanet nashville] [--num_samples 10000]
                                         [--rates 0.01] [--steps 600] [--k 16] [--reference_sizes 0 256]

For each attack and poisoning rate: `write_poisoned_world` renders the data set
(a ``rate`` fraction of the pairs get the image trigger and the caption
"banana"), `ContrastiveTraining` pretrains a small CLIP on it from scratch
through ``lit-amdet fit --config configs/pretrain_poisoned.yaml``, and
``lit-amdet scan-data --labels`` scores every pair with every detector, once
per neighbourhood size ``--k`` and reference set (the whole set, or 8 random
subsamples of ``--reference_sizes`` pairs). Also measured, so that a detection
number is never read off a model that did not learn the backdoor: the attack
success rate (fresh world
images with the trigger whose nearest caption, among "banana" and 100 clean
held-out captions, is "banana"; the same images without the trigger give the
false-trigger rate) and the clean retrieval R@1 of the trained model.
Results go to one JSON file; `--markdown` prints the BENCHMARKS.md table from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_amdet.cli import main as cli
from lit_amdet.datamodules.poisoned import CAPTIONS, LABELS, write_poisoned_world
from lit_amdet.poisoning import build_attack

TARGET = "banana"
DETECTORS = ["kdist", "lid", "slof", "dao", "iforest", "lof", "clip", "xmodal", "xgroup"]
IMAGE_SIZE = 32  # as in configs/pretrain_poisoned.yaml


def train(data_csv: Path, out: Path, work: Path, steps: int, seed: int) -> float:
    t0 = time.perf_counter()
    cli(["fit", "--config", "configs/pretrain_poisoned.yaml", "--seed_everything", str(seed),
         "--model.init_args.output_dir", str(out), "--model.init_args.warmup_steps", str(max(1, steps // 10)),
         "--data.init_args.source", str(data_csv), "--trainer.max_steps", str(steps),
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(work / "runs")])
    return time.perf_counter() - t0


def scan(model: Path, data_csv: Path, out: Path, work: Path, k: int, reference_size: int,
         *extra: str, labels: Path | None = None) -> tuple[dict, float]:
    """``lit-amdet scan-data`` with ``--labels`` (``labels``, or the one beside ``data_csv``) and ``extra`` flags."""
    t0 = time.perf_counter()
    cli(["scan-data", "--config", "configs/scan_data.yaml", "--model.init_args.encoder", str(model),
         "--data.init_args.source", str(data_csv), "--data.init_args.num_workers", "1",
         "--labels", str(labels or data_csv.parent / LABELS), "--output_dir", str(out), "--k", str(k),
         "--reference_size", str(reference_size or "null"),
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(work / "runs"), *extra])
    return json.loads((out / "report.json").read_text()), time.perf_counter() - t0


@torch.no_grad()
def backdoor_success(model: Path, attack_name: str, attack_args: dict, seed: int, n: int = 200,
                     blocks: int = 1) -> dict:
    """Attack success and clean R@1 of the trained model on world scenes it never saw (another seed).

    Triggered images pick among "banana" and the first 100 held-out captions; clean R@1 is text-to-image among
    100 pairs, averaged over the first ``blocks`` blocks of 100 (``n >= 100 * blocks``)."""
    from lit_amdet import load_encoder
    from lit_amdet.world import World

    enc = load_encoder(str(model)).eval()
    attack = build_attack(attack_name, **attack_args)
    world = World(seed=seed + 10_000, image_size=IMAGE_SIZE, num_samples=n)
    samples = [world[i] for i in range(n)]
    clean_img = [s.image for s in samples]
    captions = [s.caption for s in samples]
    # the adapter's own image transform, as in training and scanning
    transform = enc.image_transform()
    pixels = torch.stack([transform(im) for im in clean_img])
    trig = torch.stack([transform(attack(im)) for im in clean_img])
    caps = torch.nn.functional.normalize(enc.encode_text(captions[:100 * blocks] + [TARGET]), dim=-1)
    text = torch.cat([caps[:100], caps[-1:]])  # the choices of a triggered image: 100 held-out captions and TARGET
    img = torch.nn.functional.normalize(enc.encode_image(pixels), dim=-1)
    img_t = torch.nn.functional.normalize(enc.encode_image(trig), dim=-1)
    target_col = text.shape[0] - 1
    r1 = [float(((caps[b:b + 100] @ img[b:b + 100].T).argmax(1) == torch.arange(100)).float().mean())
          for b in range(0, 100 * blocks, 100)]
    return {
        "attack_success_rate": float(((img_t @ text.T).argmax(1) == target_col).float().mean()),
        "false_trigger_rate": float(((img @ text.T).argmax(1) == target_col).float().mean()),
        "clean_r1": sum(r1) / len(r1),  # t2i R@1 among 100 held-out pairs, mean over the blocks
    }


def run(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
    done = {(r["attack"], json.dumps(r["attack_args"], sort_keys=True), r["rate"], r["num_samples"], r["steps"], r["k"],
             r["reference_size"]) for r in results}
    scans = [(k, m) for k in args.k for m in args.reference_sizes]
    for rate in args.rates:
        for name in args.attacks:
            attack_args = json.loads(args.attack_args).get(name, {})
            tag = json.dumps(attack_args, sort_keys=True)
            todo = [(k, m) for k, m in scans if (name, tag, rate, args.num_samples, args.steps, k, m) not in done]
            if not todo:
                continue
            strength = "".join(f"-{key}{value}" for key, value in sorted(attack_args.items()))
            run_dir = work / f"{name}{strength}-{rate}-{args.num_samples}-{args.steps}"
            data_csv = run_dir / "data" / CAPTIONS
            if not data_csv.is_file():
                write_poisoned_world(run_dir / "data", args.num_samples, build_attack(name, **attack_args), rate,
                                     target_caption=TARGET, seed=args.seed, image_size=IMAGE_SIZE)
            model = run_dir / "model"
            train_s = train(data_csv, model, work, args.steps, args.seed) if not (model / "training.json").is_file() \
                else json.loads((model / "training.json").read_text())["seconds"]
            success = backdoor_success(model, name, attack_args, args.seed)
            for k, m in todo:  # one trained model, scanned once per neighbourhood size and reference set
                report, scan_s = scan(model, data_csv, run_dir / f"scan-k{k}-m{m}", work, k, m)
                row = {"attack": name, "attack_args": attack_args, "rate": rate, "num_samples": args.num_samples,
                       "num_poisoned": report["num_poisoned"], "steps": args.steps, "k": k, "reference_size": m,
                       "reference_draws": report["reference_draws"],
                       "train_seconds": train_s, "scan_seconds": scan_s, **success, "metrics": report["metrics"],
                       "removal_at_1pct": report.get("removal_at_1pct")}
                results.append(row)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2))  # after every scan: resumable
                print(json.dumps({key: v for key, v in row.items() if key != "metrics"}))
    return sorted(results, key=lambda r: (r["rate"], r["k"], r["reference_size"], args.attacks.index(r["attack"])
                                          if r["attack"] in args.attacks else 99))


def markdown(rows: list[dict], detectors: list[str] = DETECTORS) -> str:
    head = ("| attack | rate | poisoned / N | ASR | false trig. | clean R@1 | k | references | "
            + " | ".join(detectors) + " |")
    lines = [head, "|" + "---|" * (8 + len(detectors))]
    for r in rows:
        cells = [f"{r['metrics'][d]['auroc']:.3f} / {r['metrics'][d]['pr_auc']:.3f}" if d in r["metrics"] else "–"
                 for d in detectors]  # a detector added after the row was scanned
        refs = f"{r['reference_draws']} x {r['reference_size']}" if r["reference_size"] else "all"
        attack = r["attack"] + "".join(f" {key}={value:g}" for key, value in r["attack_args"].items())
        lines.append(f"| {attack} | {100 * r['rate']:g} % | {r['num_poisoned']} / {r['num_samples']} | "
                     f"{r['attack_success_rate']:.2f} | {r['false_trigger_rate']:.2f} | {r['clean_r1']:.2f} | "
                     f"{r['k']} | {refs} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=".cache/scan_data_world")
    parser.add_argument("--out", default="benchmarks/results/scan_data_world.json")
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blend", "sig", "wanet", "nashville"])
    # a 4-pixel BadNets patch on the 32-pixel images (the default 1/16 of the side would be 2 pixels)
    parser.add_argument("--attack_args", default='{"badnets": {"size": 0.125}}', help="JSON: attack -> arguments")
    parser.add_argument("--rates", nargs="+", type=float, default=[0.01])
    parser.add_argument("--num_samples", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--k", nargs="+", type=int, default=[16])
    parser.add_argument("--reference_sizes", nargs="+", type=int, default=[0, 256],
                        help="0: neighbours over the whole set; M: averaged over 8 random subsamples of M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="only print the table of --out")
    args = parser.parse_args()
    rows = json.loads(Path(args.out).read_text()) if args.markdown else run(args)
    print(markdown(rows))


if __name__ == "__main__":
    main()
