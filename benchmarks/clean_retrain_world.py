"""Clean a poisoned training set with `lit-amdet scan-data` and retrain on what is kept: does the backdoor go?

    python benchmarks/clean_retrain_world.py [--work .cache/clean_retrain_world]
        [--out benchmarks/results/clean_retrain_world.json] [--attacks badnets blend sig] [--rates 0.001 0.0005]
        [--num_samples 50000] [--steps 4000] [--budget 0.01] [--reference_size 2048] [--markdown]

Per attack and poisoning rate, all through the product's own commands and files:

1. `write_poisoned_world(..., shard_size=5000)` writes the world pairs as webdataset shards (img2dataset's
   layout, ``shards/{00000..00009}.tar``), a ``rate`` fraction of them with the image trigger and the caption
   "banana", and ``poison_labels.json``;
2. ``lit-amdet fit --config configs/pretrain_poisoned.yaml`` pretrains a small CLIP on the shards from scratch;
3. ``lit-amdet scan-data --budget B --write_shards true --labels ...`` scores every pair with every detector,
   cuts the ``cut_by`` detector's top ``B`` and writes ``keep.txt``, ``flagged.txt`` and the filtered shards
   (the kNN detectors are scored again on the saved embeddings against other reference sizes, for comparison);
4. the same ``fit`` retrains from scratch, same seed and steps, on the filtered shards;
5. with ``--second_budget B2``, a second round: ``scan-data`` on the filtered shards with the retrained model (a
   poison the first cut missed is learned again, and isolated again, by a model that no longer sees the
   others), a cut of its top ``B2``, and a third training on what that keeps.

Once, for the comparison the issue asks for: the same world with no poisons, trained the same way (the clean
model; its pairs are the poisoned worlds' pairs except the poisons, which replace clean ones). Attack success,
false-trigger rate and clean R@1 (`scan_data_world.backdoor_success`, 1,000 held-out world scenes: R@1 among 100
pairs, mean of 10 blocks) are measured for the poisoned, retrained and clean models. Results go to one JSON file,
written after every step (a rerun resumes); ``--markdown`` prints the BENCHMARKS.md tables from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scan_data_world import DETECTORS, IMAGE_SIZE, TARGET, backdoor_success, scan, train

from lit_amdet.cleaning import read_keys
from lit_amdet.datamodules.poisoned import LABELS, write_poisoned_world
from lit_amdet.io import write_json
from lit_amdet.poisoning import build_attack, load_labels

SHARD_SIZE = 5000
EVAL = {"n": 1000, "blocks": 10}
KNN = ["kdist", "lid", "slof", "dao"]
DRAWS = 8  # as configs/scan_data.yaml


def attack_tag(name: str, attack_args: dict) -> str:
    """An attack and its strength, as one name: ``badnets-size0.125``."""
    return name + "".join(f"-{key}{value}" for key, value in sorted(attack_args.items()))


def world(run_dir: Path, attack: str, attack_args: dict, rate: float, args) -> Path:
    """The poisoned world's shards (written once)."""
    data = run_dir / "data"
    if not (data / LABELS).is_file():
        write_poisoned_world(data, args.num_samples, build_attack(attack, **attack_args), rate,
                             target_caption=TARGET, seed=args.seed, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE)
    return data / "shards"  # a folder source: its .tar shards in order


def trained(source: Path, model: Path, work: Path, args) -> float:
    """Train (once) and return the training seconds."""
    if not (model / "training.json").is_file():
        return train(source, model, work, args.steps, args.seed)
    return json.loads((model / "training.json").read_text())["seconds"]


def successes(model: Path, attacks: dict[str, dict], seed: int) -> dict[str, dict]:
    return {name: backdoor_success(model, name, a, seed, **EVAL) for name, a in attacks.items()}


def saved_embeddings(scan_dir: Path, labels: Path) -> tuple:
    """The scan's saved image and text embeddings as unit vectors, and the poison mask in their row order."""
    import torch
    from safetensors.torch import load_file

    from lit_amdet.sample_scan import EMBEDDINGS

    saved = load_file(scan_dir / EMBEDDINGS)
    image, text = (torch.nn.functional.normalize(saved[m].float(), dim=-1) for m in ("image", "text"))
    return image, text, load_labels(labels)[saved["index"].numpy()].astype(bool)


def reference_sweep(scan_dir: Path, labels: Path, sizes: list[int], k: int, seed: int) -> list[dict]:
    """The kNN detectors again on the scan's saved embeddings (no second embedding pass) against subsamples of
    each of ``sizes`` (0: the whole set): ROC-AUC, PR-AUC and what each one's top 1 % removes. Diagnostics
    beside the cut, which the scan's own ``--reference_size`` made."""
    from lit_amdet.cleaning import metrics_at_budget
    from lit_amdet.metrics import ranking_metrics
    from lit_amdet.outliers import score_samples
    from lit_amdet.sample_scan import sample_features

    image, text, mask = saved_embeddings(scan_dir, labels)
    x = sample_features(image, text, "both")
    rows = []
    for m in sizes:
        raw = score_samples(x, KNN, k, seed=seed, reference_size=m or None, reference_draws=DRAWS)
        scores = {d: v.double().numpy() for d, v in raw.items()}
        rows.append({"reference_size": m, "metrics": {d: ranking_metrics(v, mask) for d, v in scores.items()},
                     "removal_at_1pct": metrics_at_budget(scores, mask)})
    return rows


def poison_geometry(scan_dir: Path, labels: Path, sample: int = 2000, seed: int = 0) -> dict:
    """Where the scanned model put the poisoned images, from the scan's saved embeddings (unit vectors): their
    mean pairwise cosine (how tightly they gather), their mean cosine to the nearest clean image (how far from
    clean data they sit) and to the target caption (all poisons share it), each beside the same figure for a
    random sample of clean images. Why a cut did or did not find them; no cut depends on it."""
    import torch

    image, text, mask = saved_embeddings(scan_dir, labels)
    poisoned = torch.from_numpy(mask)
    clean_rows = torch.nonzero(~poisoned).flatten()
    pick = clean_rows[torch.randperm(len(clean_rows), generator=torch.Generator().manual_seed(seed))[:sample]]
    poisons = torch.nonzero(poisoned).flatten()
    target = text[poisons[0]]  # every poison carries the target caption

    def pairwise(rows: torch.Tensor) -> float:
        sims = image[rows] @ image[rows].T
        return float((sims.sum() - sims.diagonal().sum()) / (len(rows) * (len(rows) - 1)))

    def nearest_clean(rows: torch.Tensor) -> float:
        sims = image[rows] @ image[clean_rows].T
        sims[sims >= 1 - 1e-6] = -2.0  # a row itself (and exact duplicates) is not its own neighbour
        return float(sims.max(dim=1).values.mean())

    return {"poison_pairwise_cos": pairwise(poisons), "clean_pairwise_cos": pairwise(pick),
            "poison_nearest_clean_cos": nearest_clean(poisons), "clean_nearest_clean_cos": nearest_clean(pick),
            "poison_to_target_cos": float((image[poisons] @ target).mean()),
            "clean_to_target_cos": float((image[pick] @ target).mean()),
            "clean_to_own_caption_cos": float((image[pick] * text[pick]).sum(dim=1).mean()),
            "clean_sample": int(len(pick)), "seed": seed}


def clean_model(work: Path, attacks: dict[str, dict], args, results: dict) -> dict:
    """The model trained on the same world without poisons: clean R@1 to match, ASR as the natural rate."""
    key = f"clean-{args.num_samples}-{args.steps}"
    run_dir = work / key
    known = results.get(key, {}).get("success", {})
    todo = {name: a for name, a in attacks.items() if attack_tag(name, a) not in known}
    # trained once; again only where the work folder was lost (same recipe and seed, not bit for bit the same model)
    if key not in results or todo:
        seconds = trained(world(run_dir, "badnets", {}, 0.0, args), run_dir / "model", work, args)
        results.setdefault(key, {"num_samples": args.num_samples, "steps": args.steps, "train_seconds": seconds,
                                 "success": {}})
    results[key]["success"].update({attack_tag(name, todo[name]): v
                                    for name, v in successes(run_dir / "model", todo, args.seed).items()})
    return results[key]


def scanned(model: Path, source: Path, labels: Path, out: Path, budget: float, args) -> tuple[dict, float]:
    """A cut's scan (once: a finished one has its report.json, which scan-data writes last)."""
    timing = out / "scan_seconds.json"
    if (out / "report.json").is_file() and timing.is_file():
        return json.loads((out / "report.json").read_text()), json.loads(timing.read_text())
    report, seconds = scan(model, source, out, Path(args.work), args.k, args.reference_size, "--budget", str(budget),
                           "--cut_by", args.cut_by, "--write_shards", "true", labels=labels)
    write_json(timing, seconds)
    return report, seconds


def clean_and_retrain(work: Path, name: str, attack_args: dict, rate: float, args) -> dict:
    run_dir, out = run_dir_of(planned(args, name, attack_args, rate), work)
    source = world(run_dir, name, attack_args, rate, args)
    train_s = trained(source, run_dir / "model", work, args)
    before = backdoor_success(run_dir / "model", name, attack_args, args.seed, **EVAL)
    report, scan_s = scanned(run_dir / "model", source, run_dir / "data" / LABELS, out, args.budget, args)
    sweep = reference_sweep(out, run_dir / "data" / LABELS, args.sweep_reference_sizes, args.k, args.seed)
    retrain_s = trained(out / "shards", out / "retrained", work, args)
    after = backdoor_success(out / "retrained", name, attack_args, args.seed, **EVAL)
    return {"attack": name, "attack_args": attack_args, "rate": rate, "num_samples": args.num_samples,
            "num_poisoned": report["num_poisoned"], "steps": args.steps, "k": args.k,
            "reference_size": args.reference_size, "reference_draws": report["reference_draws"],
            "budget": args.budget, "cut_by": args.cut_by, "cut": report["cut"], "seed": args.seed,
            "kept": len(read_keys(out / "keep.txt")),
            "train_seconds": train_s, "scan_seconds": scan_s, "retrain_seconds": retrain_s,
            "before": before, "after": after, "metrics": report["metrics"],
            "removal_at_1pct": report.get("removal_at_1pct"), "reference_sweep": sweep}


def setting_of(row: dict) -> tuple:
    """What a result row depends on: a row with the same setting is not run again."""
    return (attack_tag(row["attack"], row["attack_args"]), row["rate"], row["num_samples"], row["steps"],
            row["budget"], row["reference_size"], row["k"], row["cut_by"], row.get("seed", 0))


def run_dir_of(setting: dict, work: Path) -> tuple[Path, Path]:
    """The world's folder and, inside it, the first cut's folder (one per cut setting, retrained model inside),
    from a row's settings (or the command's, with the attack and rate of the row to come)."""
    s = setting
    run_dir = work / f"{attack_tag(s['attack'], s['attack_args'])}-{s['rate']}-{s['num_samples']}-{s['steps']}"
    return run_dir, run_dir / f"scan-b{s['budget']}-m{s['reference_size']}-k{s['k']}-{s['cut_by']}"


def planned(args, name: str, attack_args: dict, rate: float) -> dict:
    """The command's settings for one attack and rate: what a row it makes will record."""
    return {**vars(args), "attack": name, "attack_args": attack_args, "rate": rate}


def kept_labels(run_dir: Path, first: Path) -> Path:
    """The poison labels of what the first cut kept, in the filtered shards' order (keys are world indices)."""
    poisoned = load_labels(run_dir / "data" / LABELS)
    keys = read_keys(first / "keep.txt")
    path = first / f"kept_{LABELS}"
    write_json(path, {"num_samples": len(keys),
                      "poisoned_indices": [i for i, key in enumerate(keys) if poisoned[int(key)]]})
    return path


def second_round(row: dict, args) -> dict:
    """Scan what the first cut kept with the model retrained on it, cut its top ``second_budget``, retrain."""
    run_dir, first = run_dir_of(row, Path(args.work))
    out = first / f"round2-b{args.second_budget}"
    labels = kept_labels(run_dir, first)
    report, scan_s = scanned(first / "retrained", first / "shards", labels, out, args.second_budget, args)
    retrain_s = trained(out / "shards", out / "retrained", Path(args.work), args)
    after = backdoor_success(out / "retrained", row["attack"], row["attack_args"], args.seed, **EVAL)
    return {"budget": args.second_budget, "poisons_left": report["num_poisoned"], "cut": report["cut"],
            "kept": len(read_keys(out / "keep.txt")), "metrics": report["metrics"], "scan_seconds": scan_s,
            "retrain_seconds": retrain_s, "after": after}


def run(args: argparse.Namespace) -> dict:
    work, out = Path(args.work), Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    attacks = {name: json.loads(args.attack_args).get(name, {}) for name in args.attacks}
    done = {setting_of(r) for r in results["rows"]}
    wanted = {setting_of(planned(args, name, attack_args, rate)): (name, attack_args, rate)
              for rate in args.rates for name, attack_args in attacks.items()}
    for name, attack_args, rate in [plan for key, plan in wanted.items() if key not in done]:
        results["rows"].append(row := clean_and_retrain(work, name, attack_args, rate, args))
        write_json(out, results)  # after every world: resumable
        print(json.dumps({k: v for k, v in row.items() if k not in ("metrics", "removal_at_1pct",
                                                                    "reference_sweep")}))
    for row in results["rows"] if args.second_budget else []:
        if setting_of(row) in wanted and args.second_budget not in [r["budget"] for r in row.get("second_rounds", [])]:
            row.setdefault("second_rounds", []).append(second_round(row, args))
            write_json(out, results)
    for row in results["rows"]:  # also for rows of earlier runs whose scan is still in the work folder
        run_dir, first = run_dir_of(row, work)  # the folder has no seed in its name: only this seed's rows
        if "geometry" not in row and row.get("seed", 0) == args.seed and (first / "report.json").is_file():
            row["geometry"] = poison_geometry(first, run_dir / "data" / LABELS)
            write_json(out, results)
    clean_model(work, attacks, args, results.setdefault("clean", {}))
    write_json(out, results)
    return results


def attack_label(row: dict) -> str:
    return row["attack"] + "".join(f" {key}={value:g}" for key, value in row["attack_args"].items())


def markdown(results: dict, detectors: list[str] = DETECTORS) -> str:
    rows = sorted(results["rows"], key=lambda r: (-r["rate"], r["attack"]))
    lines = ["| attack | rate | poisoned / N | " + " | ".join(detectors) + " |", "|" + "---|" * (3 + len(detectors))]
    for r in rows:
        lines.append(f"| {attack_label(r)} | {100 * r['rate']:g} % | {r['num_poisoned']} / {r['num_samples']} | "
                     + " | ".join(f"{r['metrics'][d]['auroc']:.3f} / {r['metrics'][d]['pr_auc']:.3f}"
                                  if d in r["metrics"] else "–" for d in detectors) + " |")  # not scored then
    lines += ["", "| attack | rate | poisons removed / lost clean at 1 %: " + " | ".join(detectors) + " |",
              "|" + "---|" * (2 + len(detectors))]
    for r in rows:
        at = r["removal_at_1pct"] or {}
        lines.append(f"| {attack_label(r)} | {100 * r['rate']:g} % | "
                     + " | ".join(f"{at[d]['poisons_removed']} / {at[d]['clean_lost']}" if d in at else "–"
                                  for d in detectors) + " |")
    lines += ["", "| attack | rate | references | " + " | ".join(f"{d}: ROC-AUC, removed / lost at 1 %" for d in KNN)
              + " |", "|" + "---|" * (3 + len(KNN))]
    for r in rows:
        for sweep in [{"reference_size": r["reference_size"], "metrics": r["metrics"],
                       "removal_at_1pct": r["removal_at_1pct"], "cut": True}, *r.get("reference_sweep", [])]:
            m, at = sweep["metrics"], sweep["removal_at_1pct"]
            refs = f"{DRAWS} x {sweep['reference_size']}" if sweep["reference_size"] else "all"
            refs += " (the cut's)" if "cut" in sweep else ""
            lines.append(f"| {attack_label(r)} | {100 * r['rate']:g} % | {refs} | "
                         + " | ".join(f"{m[d]['auroc']:.3f}, {at[d]['poisons_removed']} / {at[d]['clean_lost']}"
                                      for d in KNN) + " |")
    lines += ["", "| attack | rate | cut (by) | kept | ASR before → after | false trig. after | clean R@1 before → "
              "after | clean model: R@1, ASR | train + scan + retrain s |", "|" + "---|" * 9]
    for r in rows:
        b, a = r["before"], r["after"]
        clean = results.get("clean", {}).get(f"clean-{r['num_samples']}-{r['steps']}")
        ref = clean["success"].get(attack_tag(r["attack"], r["attack_args"])) if clean else None
        # clean R@1 does not depend on the attack (the same held-out pairs); its ASR was measured per strength
        r1 = next(iter(clean["success"].values()), None) if clean else None
        ref_cell = (f"{ref['clean_r1']:.3f}, {ref['attack_success_rate']:.3f}" if ref
                    else f"{r1['clean_r1']:.3f}, –" if r1 else "–")
        lines.append(f"| {attack_label(r)} | {100 * r['rate']:g} % | {r['budget']:g} ({r['cut_by']}) | {r['kept']} | "
                     f"{b['attack_success_rate']:.3f} → {a['attack_success_rate']:.3f} | "
                     f"{a['false_trigger_rate']:.3f} | {b['clean_r1']:.3f} → {a['clean_r1']:.3f} | {ref_cell} | "
                     f"{r['train_seconds']:.0f} + {r['scan_seconds']:.0f} + {r['retrain_seconds']:.0f} |")
    return "\n".join(lines + geometry_table(rows) + second_round_table(rows))


def geometry_table(rows: list[dict]) -> list[str]:
    """Where the poisoned model put the poisoned images (`poison_geometry`), for the rows that have it."""
    lines = ["", "| attack | rate | image pairwise cos: poisons / clean | nearest clean image: poisons / clean | "
             "to the target caption: poisons / clean | clean image to its own caption |", "|" + "---|" * 6]
    for r in rows:
        if g := r.get("geometry"):
            lines.append(f"| {attack_label(r)} | {100 * r['rate']:g} % | {g['poison_pairwise_cos']:.2f} / "
                         f"{g['clean_pairwise_cos']:.2f} | {g['poison_nearest_clean_cos']:.3f} / "
                         f"{g['clean_nearest_clean_cos']:.3f} | {g['poison_to_target_cos']:.2f} / "
                         f"{g['clean_to_target_cos']:.2f} | {g['clean_to_own_caption_cos']:.2f} |")
    return lines if len(lines) > 3 else []


def second_round_table(rows: list[dict]) -> list[str]:
    """The second rounds: what the first cut left, what the second removed, and the third training's ASR."""
    lines = ["", "| attack | rate | poisons left after the first cut | second cut (by) | of those removed / clean "
             "lost | removed in all (share of N) | ASR after round 1 → round 2 | false trig. | clean R@1 after "
             "round 2 | scan + retrain s |", "|" + "---|" * 10]
    for r in rows:
        for second in r.get("second_rounds", []):
            c, a = second["cut"]["metrics"], second["after"]
            removed = r["num_samples"] - second["kept"]
            scan_s = f"{second['scan_seconds']:.0f}" if "scan_seconds" in second else "–"  # not timed: the first run
            lines.append(f"| {attack_label(r)} | {100 * r['rate']:g} % | {second['poisons_left']} | "
                         f"{second['budget']:g} ({r['cut_by']}) | {c['poisons_removed']} / {c['clean_lost']} | "
                         f"{removed} ({100 * removed / r['num_samples']:.2f} %) | "
                         f"{r['after']['attack_success_rate']:.3f} → {a['attack_success_rate']:.3f} | "
                         f"{a['false_trigger_rate']:.3f} | {a['clean_r1']:.3f} | "
                         f"{scan_s} + {second['retrain_seconds']:.0f} |")
    return lines if len(lines) > 3 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=".cache/clean_retrain_world")
    parser.add_argument("--out", default="benchmarks/results/clean_retrain_world.json")
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blend", "sig"])
    # the strengths the 1 % runs of scan_data_world.py showed the small CLIP learns (BENCHMARKS.md)
    parser.add_argument("--attack_args", default='{"badnets": {"size": 0.125}, "blend": {"alpha": 0.4}, '
                                                 '"sig": {"delta": 0.25}}', help="JSON: attack -> arguments")
    parser.add_argument("--rates", nargs="+", type=float, default=[0.001, 0.0005])
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--k", type=int, default=16)
    # the paper's regime: its code searches each batch of about 2,048 pairs on its own
    parser.add_argument("--reference_size", type=int, default=2048)
    parser.add_argument("--sweep_reference_sizes", nargs="*", type=int, default=[256, 1024, 4096, 0],
                        help="also score the saved embeddings against these (0: the whole set); no cut")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--cut_by", default="dao")
    parser.add_argument("--second_budget", type=float, default=0.0,
                        help="a second round's cut, on the first cut's shards with its retrained model (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="only print the tables of --out")
    args = parser.parse_args()
    results = json.loads(Path(args.out).read_text()) if args.markdown else run(args)
    print(markdown(results))


if __name__ == "__main__":
    main()
