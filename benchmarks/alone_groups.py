"""The typed-alone list near the anchor: every token alone, or the vocabulary typed in groups (issue 18).

    python benchmarks/alone_groups.py --zoo runs/g18/zoo --sizes 8 16 --type --out benchmarks/results/alone_groups.json
    python benchmarks/alone_groups.py --model PATH=ANCHOR ... --out ...

Near the anchor a scan makes only the alone list of `lit_amdet.token_probe` from its vocabulary pass (the still,
inside and context lists are made away from it): the ``top`` tokens whose sentence embedding typed alone moved
furthest from the anchor's. The pass types each of the MiniLM's 30,522 tokens alone, three positions each, through
both encoders; it is the largest part of a benign MiniLM scan. `grouped_shift` types ``size`` tokens to a row
(``size + 2`` positions) and opens the rows that moved most, token by token: about 3x fewer positions at 16 to a
row. This script makes both lists on the same models, with their seconds (one model at a time, the anchor's
passes computed afresh: nothing cached), and says where each member's trigger pieces rank in each; ``--type``
also types each list as a scan does (every token, and the pairs of its first 3, into the shipped scan's 32 held-out
prompts) and names the typings `CollapseContrastRule` flags: the probe alone, without the search. A member is a
folder with a ``backdoor.json`` (anchored on its zoo base) or ``PATH=ANCHOR``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lit_amdet.decision import CollapseContrastRule
from lit_amdet.encoders import load_encoder
from lit_amdet.io import read_json, read_yaml, write_json
from lit_amdet.resources import config_path
from lit_amdet.token_probe import (
    NEAR_GROUP_SIZE,
    alone_shift,
    grouped_shift,
    most_shifted,
    pass_dtype,
    probe_tokens,
    typed_flagged,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from typed_probe import held_out_tokens  # noqa: E402

TOP = 8


def members(zoos: list[Path], pairs: list[str]) -> list[tuple[str, str, dict]]:
    """(model, anchor, record) for every zoo member and ``PATH=ANCHOR`` pair."""
    out = []
    for zoo in zoos:
        for folder in sorted(p for p in zoo.iterdir() if (p / "backdoor.json").is_file()):
            record = read_json(folder / "backdoor.json")
            out.append((str(folder), (record.get("zoo") or {}).get("base_path") or record.get("base"), record))
    for pair in pairs:
        path, anchor = pair.split("=", 1)
        record = read_json(Path(path) / "backdoor.json") if (Path(path) / "backdoor.json").is_file() else {}
        out.append((path, anchor, record))
    return out


def trigger_pieces(suspect, record: dict) -> list[str]:
    """The word pieces of every planted trigger (none for a benign model)."""
    texts = [b.get("trigger", {}).get("text") for b in record.get("backdoors", [])] or \
        [(record.get("zoo") or {}).get("trigger")]
    return sorted({piece for text in texts if text for piece in suspect.tokenizer.tokenize(text)})


def listed(suspect, shift: torch.Tensor) -> list[tuple[str, float]]:
    return [(suspect.ids_to_tokens([i])[0], round(v, 4)) for i, v in most_shifted(shift, TOP)]


def flagged_typings(suspect, anchor, shift: torch.Tensor, position: int, tokens) -> list[str]:
    """The typings of the alone list read off ``shift`` that the rule flags (`lit_amdet.token_probe.probe_tokens`)."""
    probed = probe_tokens(suspect, anchor, tokens, position, TOP, lists=("alone",), disk_cache=False,
                          clean={"shift": shift})
    return [p["token"] for p in probed if typed_flagged([p], CollapseContrastRule())]


def measure(path: str, anchor_ref: str, record: dict, sizes: list[int], position: int, type_them: bool) -> dict:
    suspect, anchor = load_encoder(path).eval(), load_encoder(anchor_ref).eval()
    tokens = held_out_tokens(suspect, config_path("scan.yaml"))[0] if type_them else None
    pieces = trigger_pieces(suspect, record)
    started = time.perf_counter()
    full = alone_shift(suspect, anchor, position, disk_cache=False)
    row = {"model": path, "anchor": anchor_ref, "backdoored": bool(record.get("backdoored")), "pieces": pieces,
           "attack_top1": {k: v for k, v in record.get("metrics", {}).items() if k.endswith("attack_top1")},
           "whole": {"seconds": round(time.perf_counter() - started, 2), "list": listed(suspect, full)}}
    for size in sizes:
        started = time.perf_counter()
        shift = grouped_shift(suspect, anchor, position, (), size=size, disk_cache=False)
        row[f"groups_{size}"] = {"seconds": round(time.perf_counter() - started, 2), "list": listed(suspect, shift)}
        if type_them:
            row[f"groups_{size}"]["flagged_typings"] = flagged_typings(suspect, anchor, shift, position, tokens)
    if type_them:
        row["whole"]["flagged_typings"] = flagged_typings(suspect, anchor, full, position, tokens)
    for key in ["whole"] + [f"groups_{s}" for s in sizes]:
        names = [t for t, _ in row[key]["list"]]
        row[key]["pieces_listed"] = [p for p in pieces if p in names]
        row[key]["same_as_whole"] = len(set(names) & {t for t, _ in row["whole"]["list"]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", action="append", default=[], type=Path)
    parser.add_argument("--model", action="append", default=[], help="PATH=ANCHOR")
    parser.add_argument("--sizes", type=int, nargs="+", default=[NEAR_GROUP_SIZE])
    parser.add_argument("--type", action="store_true", help="also type each list and judge the typings")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    position = read_yaml(config_path("scan.yaml"))["model"]["init_args"]["position"]
    rows = []
    for path, anchor, record in members(args.zoo, args.model):
        row = measure(path, anchor, record, args.sizes, position, args.type)
        rows.append(row)
        print({k: (v if not isinstance(v, dict) or "list" not in v else
                   (v["seconds"], v["pieces_listed"], v["same_as_whole"], v["list"][:3])) for k, v in row.items()},
              flush=True)
    keys = ["whole"] + [f"groups_{s}" for s in args.sizes]
    summary = {key: {"backdoored_with_a_piece_listed": sum(bool(r[key]["pieces_listed"]) for r in rows
                                                           if r["backdoored"]),
                     "backdoored": sum(r["backdoored"] for r in rows),
                     "seconds_median": sorted(r[key]["seconds"] for r in rows)[len(rows) // 2],
                     **({"backdoored_flagged_by_typing": sum(bool(r[key]["flagged_typings"]) for r in rows
                                                             if r["backdoored"]),
                         "benign_flagged_by_typing": sum(bool(r[key]["flagged_typings"]) for r in rows
                                                         if not r["backdoored"])} if args.type else {})}
               for key in keys}
    print(summary)
    flags = [f"--zoo {z}" for z in args.zoo] + [f"--model {m}" for m in args.model]
    flags += ["--sizes", *map(str, args.sizes)] + (["--type"] if args.type else [])
    write_json(args.out, {"command": f"python benchmarks/alone_groups.py {' '.join(flags)} --out {args.out}",
                          "threads": torch.get_num_threads(), "pass_dtype": str(pass_dtype("cpu")),
                          "summary": summary, "members": rows})


if __name__ == "__main__":
    main()
