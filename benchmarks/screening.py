"""Marginal seconds per extra suspect: ``lit-amdet detect`` on the first suspect alone, then on all of them in
one command (a folder of links), the shipped scan config, one after the other in this invocation.

    python benchmarks/screening.py --anchor minilm --suspects runs/benchmark_drift_small/zoo/minilm-calibration-* \
        --out benchmarks/results/screening.json
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_amdet.io import write_json  # noqa: E402


def run(suspect: str, anchor: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lit_amdet", "detect", "--model.init_args.suspect", suspect,
           "--model.init_args.anchor", anchor, "--trainer.default_root_dir", str(out), "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--always_exit_zero", "true"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    verdict = re.compile(r": (clean|BACKDOORED|inconclusive( \([^()]+\))?)$")  # `inconclusive (drift)` too
    return {"command": " ".join(cmd[1:]), "wall_s": wall,
            "lines": [ln for ln in done.stdout.splitlines() if verdict.search(ln)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suspects", nargs="+", required=True)
    p.add_argument("--anchor", required=True)
    p.add_argument("--out", default="benchmarks/results/screening.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="screening-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "suspects"
        folder.mkdir()
        for s in a.suspects:
            (folder / Path(s).name).symlink_to(Path(s).resolve(), target_is_directory=Path(s).is_dir())
        alone = run(a.suspects[0], a.anchor, tmp / "alone")
        together = run(str(folder), a.anchor, tmp / "together")
        n = len(a.suspects)
        result = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average_at_end": os.getloadavg()},
            "suspects": n, "alone": alone, "together": together,
            "marginal_s_per_extra_suspect": (together["wall_s"] - alone["wall_s"]) / max(1, n - 1),
            "separate_commands_at_the_first_suspects_time_s": alone["wall_s"] * n,
        }
    write_json(a.out, result)
    print(f"one suspect alone: {alone['wall_s']:.1f} s; {n} in one command: {together['wall_s']:.1f} s; "
          f"marginal {result['marginal_s_per_extra_suspect']:.1f} s per extra suspect")


if __name__ == "__main__":
    main()
