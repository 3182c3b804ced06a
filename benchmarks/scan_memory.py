"""Peak memory and seconds of one scan against ``restarts_per_pass``, on a random-weight encoder size.

    python benchmarks/scan_memory.py --size vit-l14 --per-pass 4 2 1 --steps 10 \
        --out benchmarks/results/scan_memory.json

Each setting is ``lit-amdet detect`` with the shipped ``configs/scan.yaml``, the
given ``--model.init_args.restarts_per_pass`` and the search held to ``--steps``
steps with nothing able to stop it early (`speed.TO_THE_LIMIT`), in a fresh
process of its own, one after the other (`speed.run_ours`: wall seconds and the
process's lifetime peak RSS). The suspect and the anchor are the two random
towers of `scan_scaling.build_pair` (timing and memory only: a random encoder
says nothing about detection). Why it matters: the autograd graphs of every
restart through both towers are most of a large encoder's peak, and the
restarts are independent, so running them in passes frees each graph before
the next is built (`BackdoorDetection.restarts_per_pass`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan_scaling  # noqa: E402
import speed  # noqa: E402

from lit_amdet.io import write_json  # noqa: E402

REPO = speed.REPO


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="vit-l14", choices=sorted(scan_scaling.SIZES))
    p.add_argument("--per-pass", nargs="+", type=int, default=[4, 2, 1], help="restarts_per_pass values to run")
    p.add_argument("--steps", type=int, default=10, help="search steps of each scan (held to this limit)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--models-dir", default=str(REPO / "runs" / "scan_scaling" / "models"))
    p.add_argument("--work-root", default=str(REPO / "runs" / "scan_memory"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scan_memory.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    suspect, anchor, params = scan_scaling.build_pair(args.size, Path(args.models_dir))
    work = Path(args.work_root)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for per_pass in args.per_pass:
        extra = [*speed.TO_THE_LIMIT, "--trainer.max_steps", str(args.steps),
                 "--model.init_args.restarts_per_pass", str(per_pass)]
        r = speed.run_ours(str(suspect), str(anchor), work / f"per-pass-{per_pass}", args.threads, args.device, extra)
        rows.append({"restarts_per_pass": per_pass, **{k: r[k] for k in ("wall_s", "peak_rss_mib", "steps",
                                                                          "scan_seconds")}})
        print(f"restarts_per_pass {per_pass}: {r['wall_s']:.0f} s, {r['steps']} steps, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": "python " + " ".join([str(Path(__file__).resolve().relative_to(REPO)), *sys.argv[1:]]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "threads": args.threads, "device": args.device, "load_average_at_end": os.getloadavg()},
               "size": args.size, **scan_scaling.SIZES[args.size], "parameters": params, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, payload)  # atomic: a killed run leaves the previous results, not half a file


if __name__ == "__main__":
    main()
