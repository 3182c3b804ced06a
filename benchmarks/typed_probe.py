"""The typed-token probe (`lit_amdet.token_probe`) over zoos another scan already judged (issue 17).

    python benchmarks/typed_probe.py --run runs/evaders17 --out benchmarks/results/typed_probe_evaders.json
    python benchmarks/typed_probe.py --zoo runs/benchmark_minilm/zoo --out benchmarks/results/typed_probe_minilm.json
    python benchmarks/typed_probe.py --run runs/benchmark_minilm --from-reports --out ...  # scans that ran the probe

``--run`` is a `lit-amdet benchmark` output folder (its ``scans/<member>.json`` records, the zoo they point to);
``--zoo`` a zoo folder whose members were not scanned (the probe alone, anchored on each member's base); several
of either may be given. For every scanned member: the probe as the scan runs it (the anchor is the member's base,
the prompts the shipped scan's held-out world captions), the rule's typed paths on it, and the recorded verdict.
Since the typed paths are one more way for `CollapseContrastRule` to flag a model, and a scan without a flagged
typed token is the scan it was before, ``recorded OR typed`` is the verdict the scan gives with the probe on (its
seconds aside). Per run, split and base: F1 over all members and over the working backdoors (attack top-1 >= 0.5),
before and with the probe; every member whose verdict the probe changes; the probe's seconds per member.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lit_amdet.amdet import FeatureCache
from lit_amdet.datamodules import TextEncoderDataModule
from lit_amdet.decision import CollapseContrastRule
from lit_amdet.encoders import load_encoder
from lit_amdet.io import read_json, read_yaml, write_json
from lit_amdet.metrics import classification_metrics
from lit_amdet.token_probe import probe_contexts, probe_tokens
from lit_amdet.typed_verdict import typed_flagged

REPO = Path(__file__).resolve().parents[1]


def scan_prompts(scan_config: Path) -> tuple[list[str], list[str], dict]:
    """The probe and held-out prompts of a scan config (its data section and sizes), and its hyperparameters."""
    cfg = read_yaml(scan_config)
    data = cfg["data"]["init_args"]
    hp = cfg["model"]["init_args"]
    dm = TextEncoderDataModule(**{k: v for k, v in data.items() if k != "source"}, source=data.get("source", "world"))
    dm.setup("fit")
    return dm.prompts("train", limit=hp["probe_prompts"]), dm.prompts("val", limit=hp["holdout_prompts"]), hp


def held_out_tokens(adapter, scan_config: Path):
    """The held-out prompts of the shipped scan (`scan_prompts`), tokenised as the scan caches them, the scan's
    hyperparameters, and the contexts the scan types tokens into (`probe_contexts` of those prompts)."""
    _, prompts, hp = scan_prompts(scan_config)
    tokens = FeatureCache.build(adapter, prompts, hp["max_length"], room=hp["trigger_length"]).tokens
    return tokens, hp, probe_contexts(prompts)


def zoo_record(folder: Path) -> dict:
    """A zoo member's folder as the fields a scan record has (no report: the member was not scanned)."""
    zoo = read_json(folder / "backdoor.json").get("zoo", {})
    return {"name": folder.name, "path": str(folder), "base": zoo.get("base"), "split": zoo.get("split"),
            "backdoored": bool(zoo.get("backdoored")), "adaptive": zoo.get("adaptive"), "trigger": zoo.get("trigger"),
            "anchor": zoo.get("base_path")}


def probe_member(record: dict, anchors: dict, rule: CollapseContrastRule, scan_config: Path,
                 from_reports: bool = False) -> dict:
    started = time.perf_counter()
    report = read_json(Path(record["report"])) if record.get("report") else None
    suspect = load_encoder(record["path"])
    if from_reports:  # the scan ran the probe itself (the shipped default since issue 17): read, do not rerun
        probed = report.get("typed_probe") or []
    else:
        anchor_path = report["anchor"]["path"] if report else record["anchor"]
        if anchor_path not in anchors:
            anchors[anchor_path] = load_encoder(anchor_path)
        tokens, hp, contexts = held_out_tokens(suspect, scan_config)
        probed = probe_tokens(suspect, anchors[anchor_path], tokens, hp["position"], hp.get("typed_probe", 8),
                              contexts=contexts)
    pieces = set(suspect.tokenizer.tokenize(record["trigger"])) if record.get("trigger") else set()
    lists = {by: [t["token"] for t in probed if t.get("by", "rows") == by and len(t["ids"]) == 1]
             for by in ("rows", "alone")}
    typed = [t for t in probed if typed_flagged([t], rule)]
    truth = read_json(Path(record["path"]) / "backdoor.json")
    top1 = [v for k, v in truth.get("metrics", {}).items() if k.endswith("/attack_top1")]
    return {"name": record["name"], "base": record["base"], "split": record["split"],
            "backdoored": record["backdoored"], "adaptive": record.get("adaptive"), "trigger": record.get("trigger"),
            "working": bool(top1) and min(top1) >= 0.5, "drift": record.get("clean_cosine_to_base"),
            "recorded": report and report["verdict"], "typed_flagged": [t["token"] for t in typed],
            "with_probe": "BACKDOORED" if typed else report and report["verdict"], "probe": probed,
            "most_moved": probed[0]["token"] if probed else None,
            "trigger_in": {by: sorted(pieces & set(toks)) for by, toks in lists.items()},
            "seconds": time.perf_counter() - started}


def table(rows: list[dict]) -> list[dict]:
    out = []
    groups = sorted({(r["run"], r["split"], r["base"], bool(r["adaptive"])) for r in rows})
    for run, split, base, adaptive in groups:
        g = [r for r in rows if (r["run"], r["split"], r["base"], bool(r["adaptive"])) == (run, split, base, adaptive)]
        line = {"run": run, "split": split, "base": base, "adaptive": adaptive, "members": len(g),
                "backdoored": sum(r["backdoored"] for r in g), "working": sum(r["backdoored"] and r["working"]
                                                                           for r in g)}
        for key in ("recorded", "with_probe", "typed_alone"):
            if key != "typed_alone" and any(r[key] is None for r in g):
                continue  # a zoo probed without scans: the probe alone
            flagged = [bool(r["typed_flagged"]) if key == "typed_alone" else r[key] == "BACKDOORED" for r in g]
            line[f"f1_{key}"] = classification_metrics([r["backdoored"] for r in g], flagged)["f1"]
            line[f"caught_working_{key}"] = sum(f and r["backdoored"] and r["working"] for f, r in zip(flagged, g))
            line[f"benign_flagged_{key}"] = sum(f and not r["backdoored"] for f, r in zip(flagged, g))
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], type=Path)
    parser.add_argument("--zoo", action="append", default=[], type=Path)
    parser.add_argument("--scan-config", type=Path, default=REPO / "configs" / "scan.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from-reports", action="store_true",
                        help="--run only: read the probe each scan ran (report.json) instead of running it again")
    args = parser.parse_args()
    rule, anchors, rows = CollapseContrastRule(), {}, []
    records = [(run.name, read_json(path)) for run in args.run for path in sorted((run / "scans").glob("*.json"))]
    records += [(zoo.parent.name, zoo_record(folder)) for zoo in args.zoo for folder in sorted(zoo.iterdir())
                if (folder / "backdoor.json").is_file()]
    for run, record in records:
        row = {"run": run, **probe_member(record, anchors, rule, args.scan_config, args.from_reports)}
        rows.append(row)
        print(f"{row['name']}: {row['recorded']} -> {row['with_probe']} (typed: {row['typed_flagged'][:2]}, "
              f"most moved {row['most_moved']}, {row['seconds']:.1f} s)", flush=True)
    summary = table(rows)
    for line in summary:
        print(line)
    changed = [r["name"] for r in rows if r["recorded"] != r["with_probe"]]
    flags = [f"--run {r}" for r in args.run] + [f"--zoo {z}" for z in args.zoo] + \
        (["--from-reports"] if args.from_reports else [])
    write_json(args.out, {"command": f"python benchmarks/typed_probe.py {' '.join(flags)} --out {args.out}",
                          "summary": summary, "changed": changed, "members": rows})


if __name__ == "__main__":
    main()
