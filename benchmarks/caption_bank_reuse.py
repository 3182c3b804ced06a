"""The report's nearest captions from the scan's cached features, against encoding the caption bank again.

    python benchmarks/caption_bank_reuse.py --model DIR [--repeats 3] [--out benchmarks/results/caption_bank_reuse.json]

Why: a scan's default caption bank is its own probe and held-out prompts, whose token features it caches before the
search (`lit_amdet.amdet.FeatureCache`); `nearest_captions` took a second forward pass over all of them at the end
of every scan. It now pools them from the caches (`FeatureCache.pooled`). This script builds the two caches of the
shipped scan (`configs/scan.yaml`'s data and sizes) for one suspect and times `nearest_captions` both ways, back to
back, with whether the captions and their order agree. Too small a step to resolve in whole-scan timings on a shared
2-core machine (their run-to-run spread is about 2 s), so it is timed alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lit_amdet.amdet import FeatureCache
from lit_amdet.captions import caption_bank, nearest_captions
from lit_amdet.encoders import load_encoder
from lit_amdet.io import write_json
from lit_amdet.resources import config_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from typed_probe import scan_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a suspect checkpoint folder or built-in name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/caption_bank_reuse.json")
    args = parser.parse_args()
    probe, held, hp = scan_prompts(config_path("scan.yaml"))
    model = load_encoder(args.model).eval()
    caches = [FeatureCache.build(model, p, hp["max_length"], room=hp["trigger_length"]) for p in (probe, held)]
    bank = caption_bank(None, probe + held)
    target = torch.nn.functional.normalize(torch.randn(model.embed_dim, generator=torch.Generator().manual_seed(0)),
                                           dim=0)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        encoded = nearest_captions(model, bank, target, hp["max_length"], hp.get("top_captions", 5))
        t1 = time.perf_counter()
        known = {k: v for cache in caches for k, v in cache.pooled(model).items()}
        reused = nearest_captions(model, bank, target, hp["max_length"], hp.get("top_captions", 5), known)
        t2 = time.perf_counter()
        runs.append({"encode_s": round(t1 - t0, 4), "reuse_s": round(t2 - t1, 4),
                     "same_captions": [c["caption"] for c in encoded] == [c["caption"] for c in reused],
                     "max_cosine_difference": max(abs(a["cosine"] - b["cosine"]) for a, b in zip(encoded, reused))})
        print(runs[-1], flush=True)
    write_json(Path(args.out), {"command": " ".join(sys.argv), "model": args.model, "bank": len(bank),
                                "torch_threads": torch.get_num_threads(), "runs": runs})


if __name__ == "__main__":
    main()
