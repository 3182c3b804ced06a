"""Seconds of one ``lit-amdet detect`` scan against encoder size, tiny to ViT-L/14 text tower (random weights).

    python benchmarks/scan_scaling.py --sizes tiny small minilm vit-b32 vit-l14 --max-steps 20 \
        --out benchmarks/results/scan_scaling.json

Timing only: a random encoder says nothing about detection. Each size is an HF
``CLIPTextModelWithProjection`` (context 77, CLIP BPE vocabulary) built by
`lit_amdet.tiny.build_hf_clip` twice, suspect (seed 0) and anchor (seed 1),
saved natively under ``--models-dir`` (built once, not timed). Each scan is
``detect --config configs/scan.yaml`` (4 restarts, batch 16, the
`LossLandscape` 15 x 15 and `HessianSpectrum` callbacks) on 400 search + 100
held-out world captions of up to 32 tokens, stopped after ``--max-steps``
steps, in a fresh process of its own (`reference_scan.run_child`: wall seconds
and peak RSS of that process, one torch thread).

Stages (from `reference_scan.StageTimer` and report.json): setup (CLI, model
loading, prompts, feature cache), the search (steps plus the held-out check
that runs every 20 steps), the final held-out evaluation with its baselines,
landscape, Hessian, and writing the run folder. A full scan's 300 steps are 15
times (20 steps + 1 check), so with ``--max-steps 20`` the 300-step estimate is
setup + 15 x search + the rest; with fewer ``--max-steps`` the steps are
scaled and each of the 15 checks is taken as 4/9 of the final evaluation (which
evaluates 4 restarts twice and the clean prompts once): an approximation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_scan  # noqa: E402

REPO = reference_scan.REPO
# text towers: layers, width, heads (context 77 for all); embed_dim = the projection width
SIZES = {
    "tiny": dict(layers=2, width=64, heads=2, embed_dim=64),
    "small": dict(layers=4, width=128, heads=4, embed_dim=128),  # the world bases' text tower
    "minilm": dict(layers=6, width=384, heads=12, embed_dim=384),  # all-MiniLM-L6-v2's shape
    "vit-b32": dict(layers=12, width=512, heads=8, embed_dim=512),  # OpenAI CLIP ViT-B/32 text
    "vit-l14": dict(layers=12, width=768, heads=12, embed_dim=768),  # OpenAI CLIP ViT-L/14 text (SD 1.x)
}
FULL_STEPS, CHECK_EVERY = 300, 20  # configs/scan.yaml
SCAN_PROMPTS = 500  # 400 search + 100 held out, configs/scan.yaml's probe_prompts / holdout_prompts


def build_pair(name: str, models_dir: Path) -> tuple[Path, Path, int]:
    """Suspect and anchor of one size (built once); returns their folders and the parameter count."""
    from lit_amdet.encoders import load_encoder
    from lit_amdet.tiny import build_hf_clip

    folders = []
    for role, seed in (("suspect", 0), ("anchor", 1)):
        folder = models_dir / name / role
        if not (folder / "config.json").is_file():
            build_hf_clip(folder, arch="CLIPTextModelWithProjection", context=77, seed=seed, **SIZES[name])
        folders.append(folder)
    params = load_encoder(folders[0]).describe()["parameters"]
    return folders[0], folders[1], params


def build_near(name: str, models_dir: Path, noise: float = 0.01, tag: str = "near") -> tuple[Path, Path]:
    """A suspect near the anchor of one size, built once: the anchor's weights each times ``1 + noise * N(0, 1)``
    (seed 2), so a scan of it takes a benign model's near-anchor path (clean cosine about 0.99: the divergence
    paths, the alone list only); returns its folder and the anchor's. ``tag`` names the folder (`build_drifted`)."""
    from lit_amdet.encoders import load_encoder

    anchor = build_pair(name, models_dir)[1]
    folder = models_dir / name / tag
    if not (folder / "config.json").is_file():
        model, gen = load_encoder(anchor), torch.Generator().manual_seed(2)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1 + noise * torch.randn(param.shape, generator=gen))
        model.save(folder)
    return folder, anchor


#: `build_drifted`'s noise: the ViT-L/14-sized copy's clean pooled cosine to its anchor was 0.93 at 0.1, 0.75 at
#: 0.2 (64 world captions), so 0.15 lands between the divergence paths' 0.95 and the drift gate's 0.6
DRIFTED_NOISE = 0.15


def build_drifted(name: str, models_dir: Path) -> tuple[Path, Path]:
    """A suspect away from the anchor (`build_near` at `DRIFTED_NOISE`): a scan of it takes a benign drifted
    model's path (the whole alone pass, the still, inside and context lists, the swapped search), as a real
    fine-tune of a base does."""
    return build_near(name, models_dir, DRIFTED_NOISE, "drifted")


def measure(name: str, args: argparse.Namespace) -> dict:
    suspect, anchor, params = build_pair(name, Path(args.models_dir))
    work = Path(args.work_root) / name
    record = Path(args.work_root) / f"{name}.json"
    argv = [str(Path(reference_scan.__file__).resolve()), "--one", "ours", "--model", str(suspect), "--anchor",
            str(anchor), "--side-dir", str(work), "--record", str(record), "--probe-prompts", str(SCAN_PROMPTS),
            "--max-length", "32", "--threads", str(args.threads),
            "--ours-arg=--trainer.max_steps", f"--ours-arg={args.max_steps}"]
    started = time.time()
    measured = reference_scan.run_child(argv, Path(args.work_root) / f"{name}.log", args.threads)
    r = json.loads(record.read_text())
    marks, steps = r["timer"]["marks"], r["steps"]
    landscape, hessian = r["landscape_s"] or 0.0, r["hessian_s"] or 0.0
    setup = marks["search_start"] - started  # interpreter start, imports, CLI, loading, feature cache
    search = marks["search_end"] - marks["search_start"]
    final_eval = marks["evidence_end"] - marks["search_end"] - landscape - hessian
    write = measured["wall_s"] - (marks["evidence_end"] - started)
    if steps == CHECK_EVERY:  # exactly one check in the measured search: 15 such blocks make 300 steps
        search_300 = search * FULL_STEPS / CHECK_EVERY
    else:
        # no check measured in the search: one check is one held-out evaluation of the 4 restarts, and the
        # final evaluation is 2 x 4 + 1 restart-evaluations (the trigger, the random init, the clean prompts)
        pure = (search - (final_eval * 4 / 9 if steps >= CHECK_EVERY else 0.0)) / steps
        search_300 = pure * FULL_STEPS + FULL_STEPS // CHECK_EVERY * final_eval * 4 / 9
    row = {
        "size": name, **SIZES[name], "context": 77, "parameters": params, "steps_measured": steps,
        "wall_s": measured["wall_s"], "peak_rss_mib": measured["peak_rss_mib"],
        "setup_s": setup, "search_s": search, "step_s_mean": sum(r["timer"]["step_seconds"]) / steps,
        "search_per_step_s": search / steps, "final_eval_s": final_eval, "landscape_s": landscape,
        "hessian_s": hessian, "write_s": write,
        "estimated_300_step_scan_s": setup + search_300 + final_eval + landscape + hessian + write,
    }
    print(f"{name}: {params / 1e6:.1f} M params, {measured['wall_s']:.0f} s for {steps} steps "
          f"(step {row['step_s_mean']:.2f} s, landscape {landscape:.0f} s, Hessian {hessian:.0f} s); "
          f"300 steps ~ {row['estimated_300_step_scan_s']:.0f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help=f"some of {', '.join(SIZES)}")
    p.add_argument("--max-steps", type=int, default=CHECK_EVERY, help="search steps per measured scan")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each scan process")
    p.add_argument("--models-dir", default=str(REPO / "runs" / "scan_scaling" / "models"))
    p.add_argument("--work-root", default=str(REPO / "runs" / "scan_scaling" / "scans"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scan_scaling.json"))
    args = p.parse_args(argv)
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size {unknown[0]!r} (known: {', '.join(SIZES)})")
    if args.max_steps < 1 or args.threads < 1:
        p.error("--max-steps and --threads must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.work_root).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    # sizes measured before (another --sizes run) are kept, the ones measured now replaced
    before = json.loads(out.read_text()) if out.is_file() else {"sizes": []}
    rows = {r["size"]: r for r in before["sizes"]}
    command = "python " + " ".join([str(Path(__file__).relative_to(REPO)), *sys.argv[1:]])
    commands = [c for c in before.get("commands", [before["command"]] if "command" in before else [])
                if c != command] + [command]
    for name in args.sizes:
        rows[name] = {**measure(name, args), "command": command}
        payload = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "commands": commands,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "threads": args.threads, "device": "cpu", "load_average": os.getloadavg()},
            "settings": {"config": "configs/scan.yaml", "search_prompts": 400, "held_out_prompts": 100,
                         "max_length": 32, "full_steps": FULL_STEPS,
                         "model": "CLIPTextModelWithProjection, random weights, context 77"},
            "sizes": [rows[s] for s in SIZES if s in rows],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
