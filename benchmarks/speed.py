"""Time to a verdict, side by side: the public AMDET procedure at its own defaults against ``lit-amdet detect``.

    python benchmarks/speed.py \
        --pair runs/zoo/minilm-backdoored=minilm --pair runs/zoo/minilm-benign=minilm \
        --pair runs/zoo/clip-backdoored=.cache/bases/clip ... \
        --out benchmarks/results/speed.json [--device cuda]

For each ``MODEL=ANCHOR`` pair, one after the other in this one invocation, on
the same machine:

1. **the reference** (`reference_scan.reference_scan`, the procedure with its
   costs) at its own defaults: 4,000 probe prompts (80 % search, 20 % held
   out), 2 epochs at batch 10, its batch-1 checks and, when they pass, its
   50 x 50 landscape and 25 x 25 plot grid; in a child process of its own;
2. **ours**: ``python -m lit_amdet detect --config configs/scan.yaml`` with the
   shipped defaults and nothing else but the suspect, the anchor and the run
   folder, as a user runs it; in a child process of its own, **cold**: with an
   empty disk cache (`lit_amdet.anchor_cache`, emptied before every run), as the
   first scan against an anchor on a new machine is. ``--warm`` adds a second run
   of ours with the entry the cold run left (every later scan against that
   anchor): its time and ratio are reported beside, never in place of, the cold
   ones.

Both sides' wall seconds cover the whole process: interpreter start, imports,
model loading, prompts, the scan and its files. Peak RSS is the process's
lifetime maximum (``wait4``). Both sides get the same torch threads
(``--threads``, default every core). The speed-up of a pair is reference
seconds / ours; the summary gives the median and the minimum over pairs, and
the goal of issue 18 (median >= 10x, no pair below 5x). A side's verdict is
compared with the truth in the model's backdoor.json.

``--baseline-tree DIR`` (another checkout, e.g. ``git worktree add DIR COMMIT``)
also times that tree's ``detect``, with its own ``configs/scan.yaml``, on every
pair, alternating with ours ``--repeats`` times (the median run counts): the
gain of a change to the scan, measured side by side in one invocation;
``--no-reference`` leaves the reference out of such a run (without a baseline
tree: ours alone, its seconds and peak memory).

``--near-sizes vit-l14`` and ``--drifted-sizes vit-l14`` time pairs of a
random-weight tower and a copy of it near the anchor (every weight scaled by
1 + 0.01 N(0, 1): a benign model's near-anchor path) or away from it (0.15:
clean pooled cosine about 0.85, where a benign scan makes the whole alone pass,
the still, inside and context lists and the swapped search): timing and memory
of the paths a real fine-tune takes, not detection.

``--sizes vit-b32 vit-l14`` also times ours alone on the random-weight
HF CLIP text towers of `scan_scaling` (suspect and anchor two random models;
timing only, a random encoder says nothing about detection), twice each: with
the shipped defaults, and with the search held to its step limit (no early
stop of any kind: the rule's thresholds out of reach, the benign stop and the
stall test off), which is the longest a scan with the shipped settings can run.

Nothing is estimated: every figure is a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from lit_amdet.io import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_scan  # noqa: E402
import scan_scaling  # noqa: E402

REPO = reference_scan.REPO
REFERENCE_PROMPTS, REFERENCE_EPOCHS, REFERENCE_GRID = 4000, 2, 50  # the reference's own defaults
# the longest scan the shipped settings allow: nothing can pass, nothing stops early
TO_THE_LIMIT = ["--model.init_args.benign_stop", "false", "--model.init_args.patience", "100000",
                "--model.init_args.rule.init_args.min_collapse_lift", "2",
                "--model.init_args.rule.init_args.min_pooled_collapse_lift", "2",
                "--model.init_args.rule.init_args.min_typed_pooled_collapse_lift", "2",
                "--model.init_args.rule.init_args.divergence_min_clean_cos", "2"]


def our_argv(model: str, anchor: str, run_dir: Path, device: str, tree: Path = REPO) -> list[str]:
    """The user's command: the shipped scan config (``tree``'s), the suspect, the anchor, a run folder (and the
    device)."""
    argv = ["-m", "lit_amdet", "detect", "--config", str(tree / "configs" / "scan.yaml"),
            "--model.init_args.suspect", model, "--model.init_args.anchor", anchor,
            "--model.init_args.output_dir", str(run_dir), "--trainer.default_root_dir", str(run_dir.parent / "root"),
            "--trainer.logger.init_args.save_dir", str(run_dir.parent / "root")]
    if device != "cpu":
        argv += ["--trainer.accelerator", reference_scan.accelerator_of(device), "--trainer.devices", "1"]
    return argv


def run_ours(model: str, anchor: str, side_dir: Path, threads: int, device: str, extra: list[str] = (),
             tree: Path = REPO, cache: Path | None = None, cold: bool = True) -> dict:
    """``detect`` of the checkout ``tree`` (this one by default) on one pair, in a child process run there, with the
    disk cache in ``cache`` (default: ``side_dir``'s sibling ``anchor-cache``), emptied first when ``cold``."""
    run_dir = side_dir / "run"
    shutil.rmtree(side_dir, ignore_errors=True)
    side_dir.mkdir(parents=True)
    cache = cache or side_dir.parent / "anchor-cache"
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["LIT_AMDET_CACHE"] = str(cache)  # the child's (run_child passes this process's environment)
    measured = reference_scan.run_child(our_argv(model, anchor, run_dir, device, tree) + list(extra),
                                        side_dir.parent / f"{side_dir.name}.log", threads, ok_codes=(0, 1, 3),
                                        cwd=tree)
    report = json.loads((run_dir / "report.json").read_text())
    return {**measured, "verdict": report["verdict"], "backdoored": bool(report["backdoored"]),
            "steps": report["steps"], "stopped": report["stopped_early"], "decided_by": report["decided_by"],
            "scan_seconds": report["seconds"], "prompts": report["prompts"],
            "parameters": report["suspect"].get("parameters")}


def run_reference(model: str, anchor: str, side_dir: Path, prompts_file: Path, threads: int, device: str,
                  prompts: int = REFERENCE_PROMPTS) -> dict:
    side_dir.mkdir(parents=True, exist_ok=True)
    record = side_dir.parent / "reference.json"
    argv = [str(Path(reference_scan.__file__).resolve()), "--one", "reference", "--model", model, "--anchor", anchor,
            "--side-dir", str(side_dir), "--record", str(record), "--probe-prompts", str(prompts),
            "--grid", str(REFERENCE_GRID), "--epochs", str(REFERENCE_EPOCHS), "--prompts-file", str(prompts_file),
            "--threads", str(threads), "--device", device]
    measured = reference_scan.run_child(argv, side_dir.parent / "reference.log", threads)
    result = json.loads(record.read_text())
    return {**measured, **{k: result[k] for k in ("verdict", "backdoored", "steps", "stopped", "seconds", "prompts",
                                                  "stages_s")}}


def time_size(name: str, models_dir: Path, work_root: Path, threads: int, device: str) -> dict:
    """Ours on one random-weight size (built once under ``models_dir``, not timed): the shipped defaults, then
    held to the step limit."""
    suspect, anchor, params = scan_scaling.build_pair(name, models_dir)
    row = {"size": name, **scan_scaling.SIZES[name], "context": 77, "parameters": params}
    for label, extra in (("shipped", []), ("to_the_step_limit", TO_THE_LIMIT)):
        print(f"[{name}] ours, {label} ...", flush=True)
        r = run_ours(str(suspect), str(anchor), work_root / name / label, threads, device, extra)
        row[label] = {k: r[k] for k in ("wall_s", "peak_rss_mib", "steps", "stopped", "scan_seconds")}
        print(f"  {r['wall_s']:.0f} s, {r['steps']} steps ({r['stopped']}), {r['peak_rss_mib']:.0f} MiB", flush=True)
    return row


def summarise(rows: list[dict]) -> dict:
    out: dict = {"pairs": len(rows), "ours_correct": sum(r["ours"]["backdoored"] == r["truth_backdoored"]
                                                         for r in rows)}
    if rows and "reference" in rows[0]:
        speedups = [r["speedup"] for r in rows]
        out.update(speedup_median=statistics.median(speedups), speedup_min=min(speedups),
                   speedup_max=max(speedups),
                   reference_correct=sum(r["reference"]["backdoored"] == r["truth_backdoored"] for r in rows),
                   goal_met=statistics.median(speedups) >= 10 and min(speedups) >= 5)
        if "speedup_warm" in rows[0]:
            warm = [r["speedup_warm"] for r in rows]
            out.update(speedup_warm_median=statistics.median(warm), speedup_warm_min=min(warm),
                       ours_warm_correct=sum(r["ours_warm"]["backdoored"] == r["truth_backdoored"] for r in rows))
    if rows and "baseline" in rows[0]:
        gains = [r["gain"] for r in rows]
        out.update(gain_median=statistics.median(gains), gain_min=min(gains), gain_max=max(gains),
                   same_verdicts=sum(r["baseline"]["verdict"] == r["ours"]["verdict"] for r in rows))
    return out


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count), with every run's wall seconds and peak
    resident set (a memory goal is judged on the highest run, not the median's)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[(len(ordered) - 1) // 2], "wall_runs_s": [r["wall_s"] for r in runs],
            "peak_rss_runs_mib": [r["peak_rss_mib"] for r in runs]}


def table(rows: list[dict]) -> str:
    sides = [s for s in ("reference", "baseline") if rows and s in rows[0]]
    warm = bool(rows) and "ours_warm" in rows[0]
    head = "| model (truth) | " + "".join(f"{s} s | verdict | " for s in sides) + "ours s | verdict | steps | " \
        + "".join(f"{'x' if s == 'reference' else 'gain'} | " for s in sides) + "peak RSS MiB ours |" \
        + (" ours warm s | x warm |" if warm else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        truth = "backdoored" if r["truth_backdoored"] else "benign"
        ours = r["ours"]
        line = f"| {r['name']} ({truth}) | "
        line += "".join(f"{r[s]['wall_s']:.1f} | {r[s]['verdict']} | " for s in sides)
        line += f"{ours['wall_s']:.1f} | {ours['verdict']} | {ours['steps']} | "
        line += "".join(f"{r['speedup' if s == 'reference' else 'gain']:.2f} | " for s in sides)
        line += f"{ours['peak_rss_mib']:.0f} |"
        if warm:
            line += f" {r['ours_warm']['wall_s']:.1f} | " + (f"{r['speedup_warm']:.2f} |" if "speedup_warm" in r
                                                             else "- |")
        lines.append(line)
    return "\n".join(lines)


def absolute(path: str) -> str:
    """A model path as every child can read it, whatever folder it runs in (a built-in name is kept)."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", action="append", default=[], metavar="MODEL=ANCHOR",
                   help="a suspect folder (its backdoor.json gives the truth) and the clean base it is scanned against")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed.json"))
    p.add_argument("--work-root", default=str(REPO / "runs" / "speed"), help="work folders (replaced at the start)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each side")
    p.add_argument("--device", default="cpu", help="cpu or cuda: both sides run there")
    p.add_argument("--reference-prompts", type=int, default=REFERENCE_PROMPTS,
                   help="the reference's probe prompts (its default 4,000; fewer only to try the script out)")
    p.add_argument("--models-dir", default=str(REPO / "runs" / "scan_scaling" / "models"),
                   help="where the random-weight sizes are built (once)")
    p.add_argument("--baseline-tree", help="another checkout of lit-amdet: its detect is timed on every pair too")
    p.add_argument("--repeats", type=int, default=1, help="runs of ours (and of the baseline) per pair, alternating; "
                                                          "the median run counts")
    p.add_argument("--no-reference", action="store_true",
                   help="leave the reference out (ours against the baseline; without one, ours alone)")
    p.add_argument("--warm", action="store_true", help="also time ours again with the disk cache its cold run left")
    p.add_argument("--sizes", nargs="*", default=[], help=f"random-weight sizes to time ours on: "
                                                          f"{', '.join(scan_scaling.SIZES)}")
    p.add_argument("--near-sizes", nargs="*", default=[], help="random-weight sizes timed as pairs, like --pair: "
                                                               "a suspect near the anchor (scan_scaling.build_near)")
    p.add_argument("--drifted-sizes", nargs="*", default=[], help="the same, a suspect away from the anchor "
                                                                  "(scan_scaling.build_drifted)")
    args = p.parse_args(argv)
    if not (args.pair or args.sizes or args.near_sizes or args.drifted_sizes):
        p.error("give --pair MODEL=ANCHOR (repeated), --sizes, --near-sizes and/or --drifted-sizes")
    unknown = [s for s in args.sizes + args.near_sizes + args.drifted_sizes if s not in scan_scaling.SIZES]
    if unknown:
        p.error(f"unknown size {unknown[0]!r} (known: {', '.join(scan_scaling.SIZES)})")
    pairs = []
    for item in args.pair:
        model, sep, anchor = item.partition("=")
        if not sep or not Path(model).exists():
            p.error(f"--pair {item!r}: give MODEL=ANCHOR with an existing model folder")
        pairs.append((absolute(model), absolute(anchor), Path(model).name))
    baseline = Path(args.baseline_tree).resolve() if args.baseline_tree else None
    if baseline is not None and not (baseline / "lit_amdet" / "cli.py").is_file():
        p.error(f"--baseline-tree {args.baseline_tree}: not a lit-amdet checkout (no lit_amdet/cli.py)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    reference_scan.accelerator_of(args.device)  # a bad device fails before any run
    # built (once) only after every argument is checked: an L/14-sized pair takes a minute
    models_dir = Path(args.models_dir).resolve()
    pairs += [(*map(str, scan_scaling.build_near(n, models_dir)), f"{n}-near") for n in args.near_sizes]
    pairs += [(*map(str, scan_scaling.build_drifted(n, models_dir)), f"{n}-drifted") for n in args.drifted_sizes]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work_root = Path(args.work_root).resolve()  # absolute: the baseline runs in its own tree
    shutil.rmtree(work_root, ignore_errors=True)
    work_root.mkdir(parents=True)
    prompts_file = work_root / "prompts.txt"
    if pairs and not args.no_reference:
        prompts_file.write_text("\n".join(reference_scan.world_prompts(args.reference_prompts)) + "\n")
    rows = []
    for model, anchor, name in pairs:  # name: the pair's work folder and its name in the table
        row = {"model": model, "anchor": anchor, "name": name, "truth_backdoored": reference_scan.truth_of(model)}
        if not args.no_reference:
            print(f"[{name}] reference ...", flush=True)
            row["reference"] = run_reference(model, anchor, work_root / name / "reference", prompts_file,
                                             args.threads, args.device, args.reference_prompts)
            print(f"  {row['reference']['verdict']} in {row['reference']['wall_s']:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
        for _ in range(args.repeats):
            for side, tree in (("ours", REPO), ("baseline", baseline)):
                if tree is not None:
                    runs[side].append(run_ours(model, anchor, work_root / name / side, args.threads, args.device,
                                               tree=tree, cache=work_root / name / f"{side}-cache"))
                    print(f"  {side}: {runs[side][-1]['verdict']} in {runs[side][-1]['wall_s']:.1f} s", flush=True)
        row["ours"] = median_run(runs["ours"])
        if "reference" in row:
            row["speedup"] = row["reference"]["wall_s"] / row["ours"]["wall_s"]
            print(f"  ours {row['speedup']:.1f}x the reference", flush=True)
        if args.warm:
            row["ours_warm"] = run_ours(model, anchor, work_root / name / "ours", args.threads, args.device,
                                        cache=work_root / name / "ours-cache", cold=False)
            print(f"  ours warm: {row['ours_warm']['verdict']} in {row['ours_warm']['wall_s']:.1f} s", flush=True)
            if "reference" in row:
                row["speedup_warm"] = row["reference"]["wall_s"] / row["ours_warm"]["wall_s"]
        if baseline is not None:
            row["baseline"] = {**median_run(runs["baseline"]), "tree": str(baseline)}
            row["gain"] = row["baseline"]["wall_s"] / row["ours"]["wall_s"]
            print(f"  ours {row['gain']:.2f}x the baseline", flush=True)
        rows.append(row)
        shutil.rmtree(work_root / name, ignore_errors=True)  # the reference's 4,000 x 2 feature files
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": "python " + " ".join([str(Path(__file__).resolve().relative_to(REPO)), *sys.argv[1:]]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "threads_per_side": args.threads, "device": args.device, "repeats": args.repeats,
                           "load_average_at_end": os.getloadavg()},
               "reference": {"probe_prompts": args.reference_prompts, "epochs": REFERENCE_EPOCHS,
                             "grid": REFERENCE_GRID, "schedule": "issue"},
               "ours": "python -m lit_amdet detect --config configs/scan.yaml (shipped defaults; cold: an empty "
                       "disk cache before every run" + ("; warm: again with the entry the cold run left)" if args.warm
                                                        else ")"),
               "models": rows, "summary": summarise(rows) if rows else None,
               "sizes": [time_size(name, Path(args.models_dir), work_root, args.threads, args.device)
                         for name in args.sizes]}
    out = write_json(args.out, payload)
    for row in payload["sizes"]:
        print(f"{row['size']}: shipped {row['shipped']['wall_s']:.0f} s, to the step limit "
              f"{row['to_the_step_limit']['wall_s']:.0f} s, peak RSS "
              f"{row['to_the_step_limit']['peak_rss_mib']:.0f} MiB")
    if not rows:
        print(f"wrote {out}")
        return
    print(table(rows))
    s = payload["summary"]
    if "speedup_median" in s:
        print(f"median {s['speedup_median']:.1f}x, min {s['speedup_min']:.1f}x; ours correct {s['ours_correct']}/"
              f"{len(rows)}, reference {s['reference_correct']}/{len(rows)}; goal met: {s['goal_met']}")
    if "speedup_warm_median" in s:
        print(f"warm disk cache: median {s['speedup_warm_median']:.1f}x, min {s['speedup_warm_min']:.1f}x; "
              f"ours correct {s['ours_warm_correct']}/{len(rows)}")
    if "gain_median" in s:
        print(f"against the baseline: median {s['gain_median']:.2f}x ({s['gain_min']:.2f}-{s['gain_max']:.2f}x), "
              f"same verdict {s['same_verdicts']}/{len(rows)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
