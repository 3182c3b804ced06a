"""Analysis figures: the paper's Figures 2-4 on our models, to PNG, JSON and TensorBoard.

    python benchmarks/figures.py --backdoored runs/benchmark_quick/zoo/minilm-test-backdoored-000 \\
        --benign runs/benchmark_quick/zoo/minilm-test-benign-000 --out benchmarks/figures \\
        [--prompts 375] [--tensorboard runs/figures/tb]

Several pairs: repeat ``--backdoored`` (and ``--benign`` as often, or once for
all). Each backdoored model's ground-truth trigger is read from its
``backdoor.json``; held-out world captions (a world seed no zoo member trains on)
are poisoned with it, and both models of the pair see the same clean and
triggered prompts. Writes to ``--out``:

- ``fig2_sim_x.png``: Sim_X of clean (blue) vs triggered (red) prompts, benign and
  backdoored model (paper Fig. 2);
- ``fig3_attention.png``: last-layer, head-averaged attention map of one triggered
  prompt on each model (paper Fig. 3; the paper: attention on BOS in the benign
  model, on the trigger in the backdoored one);
- ``fig4_attention_mass.png``: KDEs over the triggered prompts of the mean attention
  the other tokens put on the BOS token vs on the trigger (paper Fig. 4);
- ``figures.json``: the numbers behind them (means, medians, quartiles).

With ``--tensorboard DIR`` the same figures (``add_figure``) and the per-prompt
values (``add_histogram``) go to TensorBoard. A missing model or ground truth is
a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lit_amdet import LitAmdetError, load_encoder  # noqa: E402
from lit_amdet.analysis import (  # noqa: E402
    AttentionExample,
    PromptAnalysis,
    analyse_prompts,
    attention_example,
    tokenize_compact,
)
from lit_amdet.record import BackdoorRecord  # noqa: E402
from lit_amdet.triggers import Trigger, poison  # noqa: E402
from lit_amdet.world import World  # noqa: E402

#: a world seed no zoo member trains on (members' data seeds are >= 10,000,000); the zoo's drift prompts use it too
HELD_OUT_WORLD_SEED = 31337
ROLES = ("benign", "backdoored")
DPI = 100
CLEAN_COLOUR, TRIGGER_COLOUR, BOS_COLOUR = "tab:blue", "tab:red", "tab:blue"


@dataclass
class Pair:
    backdoored: Path
    benign: Path
    trigger: Trigger
    target: str | None
    clean: list[str]
    triggered: list[str]
    results: dict[str, PromptAnalysis] | None = None
    examples: dict[str, AttentionExample] | None = None

    @property
    def label(self) -> str:
        return f"{self.backdoored.name} vs {self.benign.name}"


def ground_truth_trigger(model_dir: Path) -> tuple[Trigger, str | None]:
    """The (first) planted trigger and its target, from the backdoored model's ``backdoor.json``."""
    path = BackdoorRecord.path(model_dir)
    if not BackdoorRecord.exists(model_dir):
        raise LitAmdetError(f"{model_dir}: no backdoor.json (the ground truth of a backdoored model)")
    truth = BackdoorRecord.read(model_dir)  # unreadable: a one-line ConfigError naming the file
    if not truth.backdoored or not truth.backdoors:
        raise LitAmdetError(f"{path}: says the model has no backdoor; pass it as --benign")
    try:
        first = truth.first_backdoor
        return Trigger(**first["trigger"]), first.get("target")
    except (KeyError, TypeError) as exc:
        raise LitAmdetError(f"{path}: the first backdoor has no usable trigger ({exc!r})") from exc


def pair_up(backdoored: list[str], benign: list[str]) -> list[tuple[Path, Path]]:
    if len(benign) not in (1, len(backdoored)):
        raise LitAmdetError(f"give --benign once or once per --backdoored ({len(backdoored)}), not {len(benign)} times")
    benign = benign * len(backdoored) if len(benign) == 1 else benign
    pairs = [(Path(a), Path(b)) for a, b in zip(backdoored, benign)]
    for path in (p for pair in pairs for p in pair):
        if not path.is_dir():
            raise LitAmdetError(f"{path}: no such model folder")
    return pairs


def summary(values: torch.Tensor) -> dict:
    v = values[~torch.isnan(values)].double()
    if v.numel() == 0:
        return {"n": 0}
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
    return {"n": int(v.numel()), "mean": float(v.mean()), "median": q[1], "q25": q[0], "q75": q[2],
            "min": float(v.min()), "max": float(v.max())}


def pick_example(pair: Pair, adapter) -> int:
    """A triggered prompt short enough to read on the axes (8-16 tokens) whose trigger tokens were found."""
    found = pair.results["backdoored"].trigger_found
    lengths = [int(tokenize_compact(adapter, [p]).token_mask.sum()) for p in pair.triggered]
    usable = [i for i in range(len(lengths)) if bool(found[i])] or list(range(len(lengths)))
    fits = [i for i in usable if 8 <= lengths[i] <= 16]
    return fits[0] if fits else min(usable, key=lengths.__getitem__)


# ----- drawing ---------------------------------------------------------------------------------------------------
def _panels(rows: int, width: float = 10.0, height: float = 3.2):
    # constrained layout keeps the suptitle clear of the panel titles
    fig, axes = plt.subplots(rows, 2, figsize=(width, height * rows), squeeze=False, layout="constrained")
    return fig, axes


def draw_sim_x(pairs: list[Pair]):
    fig, axes = _panels(len(pairs))
    for row, pair in enumerate(pairs):
        values = [pair.results[r].sim_x_clean for r in ROLES] + [pair.results[r].sim_x_triggered for r in ROLES]
        low = min(float(v.min()) for v in values)
        bins = np.linspace(min(low, 0.0), 1.0, 41)
        for col, role in enumerate(ROLES):
            ax, res = axes[row][col], pair.results[role]
            ax.hist(res.sim_x_clean.numpy(), bins=bins, alpha=0.6, color=CLEAN_COLOUR, label="clean prompts")
            ax.hist(res.sim_x_triggered.numpy(), bins=bins, alpha=0.6, color=TRIGGER_COLOUR,
                    label=f"triggered ({pair.trigger.text!r})")
            name = (pair.benign if role == "benign" else pair.backdoored).name
            ax.set_title(f"{role}: {name}", fontsize=9)
            ax.set_xlabel("Sim_X (mean pairwise cosine of token features)")
            ax.set_ylabel("prompts")
            ax.legend(fontsize=8)
    fig.suptitle("Fig. 2: Sim_X of clean vs triggered prompts")
    return fig


def draw_attention(pairs: list[Pair]):
    n = max(len(pair.examples[r].tokens) for pair in pairs for r in ROLES)
    side = min(max(4.0, 0.32 * n + 1.5), 9.0)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(2 * side + 1.0, side * len(pairs) + 0.4), squeeze=False,
                             layout="constrained")
    for row, pair in enumerate(pairs):
        for col, role in enumerate(ROLES):
            ax, ex = axes[row][col], pair.examples[role]
            image = ax.imshow(ex.attention.numpy(), cmap="viridis", vmin=0.0)
            ticks = range(len(ex.tokens))
            ax.set_xticks(ticks, ex.tokens, rotation=90, fontsize=7)
            ax.set_yticks(ticks, ex.tokens, fontsize=7)
            for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                for j in ex.trigger_positions:
                    labels[j].set_color(TRIGGER_COLOUR)
                    labels[j].set_fontweight("bold")
            ax.set_xlabel("key (attended to)", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
            name = (pair.benign if role == "benign" else pair.backdoored).name
            ax.set_title(f"{role}: {name}\nother tokens' attention on BOS {ex.bos_mass:.2f}, "
                         f"on the trigger {ex.trigger_mass:.2f}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Fig. 3: last-layer attention (mean over heads); trigger tokens in red", fontsize=10)
    return fig


def gaussian_kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """1-D Gaussian KDE with Scott's bandwidth (as scipy.stats.gaussian_kde, without importing scipy.stats)."""
    bandwidth = values.std(ddof=1) * values.size ** (-1 / 5)
    z = (grid[:, None] - values[None, :]) / bandwidth
    return np.exp(-0.5 * z**2).sum(1) / (values.size * bandwidth * math.sqrt(2 * math.pi))


def _kde(ax, values: torch.Tensor, colour: str, label: str) -> None:
    v = values[~torch.isnan(values)].double().numpy()
    if v.size == 0:
        return
    if v.size < 2 or float(v.std()) < 1e-6:  # a KDE of (nearly) constant values is singular: mark the value
        ax.axvline(float(v.mean()), color=colour, label=f"{label} (all {v.mean():.2f})")
        return
    grid = np.linspace(0.0, 1.0, 400)
    density = gaussian_kde(v, grid)
    ax.plot(grid, density, color=colour, label=f"{label} (mean {v.mean():.2f})")
    ax.fill_between(grid, density, color=colour, alpha=0.25)


def draw_attention_mass(pairs: list[Pair]):
    fig, axes = _panels(len(pairs))
    for row, pair in enumerate(pairs):
        for col, role in enumerate(ROLES):
            ax, res = axes[row][col], pair.results[role]
            _kde(ax, res.bos_mass, BOS_COLOUR, "on BOS")
            _kde(ax, res.trigger_mass, TRIGGER_COLOUR, f"on trigger {pair.trigger.text!r}")
            name = (pair.benign if role == "benign" else pair.backdoored).name
            ax.set_title(f"{role}: {name}", fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_xlabel("share of last-layer attention (mean over heads and queries)")
            ax.set_ylabel("density")
            ax.legend(fontsize=8)
    fig.suptitle("Fig. 4: attention on BOS vs on the trigger, triggered prompts")
    return fig


# ----- running ---------------------------------------------------------------------------------------------------
def analyse(pairs: list[Pair], batch_size: int) -> None:
    loaded: dict[Path, object] = {}
    for pair in pairs:
        adapters = {}
        for role in ROLES:
            path = pair.benign if role == "benign" else pair.backdoored
            if path not in loaded:
                loaded[path] = load_encoder(path).eval()
            adapters[role] = loaded[path]
        pair.results = {role: analyse_prompts(adapters[role], pair.clean, pair.triggered, pair.trigger.text,
                                              batch_size) for role in ROLES}
        i = pick_example(pair, adapters["backdoored"])  # the same prompt on both models
        pair.examples = {role: attention_example(adapters[role], pair.clean[i], pair.triggered[i], pair.trigger.text)
                         for role in ROLES}


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x  # strict JSON has no NaN


def report(pairs: list[Pair], argv: list[str], prompts: int, world_seed: int, seconds: float) -> dict:
    out = {"command": " ".join(["python", "benchmarks/figures.py", *argv]), "prompts": prompts,
           "world_seed": world_seed, "seconds": round(seconds, 1),
           "attention": "last layer, mean over heads; per prompt the mean over query tokens other than BOS and "
                        "the trigger (causal models: only queries at or after the trigger)",
           "pairs": []}
    for pair in pairs:
        entry = {"backdoored": str(pair.backdoored), "benign": str(pair.benign), "trigger": vars(pair.trigger),
                 "target": pair.target, "prompts": len(pair.clean),
                 "example_prompt": pair.examples["backdoored"].prompt, "models": {}}
        for role in ROLES:
            res, ex = pair.results[role], pair.examples[role]
            entry["models"][role] = {
                "sim_x_clean": summary(res.sim_x_clean), "sim_x_triggered": summary(res.sim_x_triggered),
                "attention_on_bos": summary(res.bos_mass), "attention_on_trigger": summary(res.trigger_mass),
                "trigger_found": int(res.trigger_found.sum()),
                "example_attention_on_bos": _finite(ex.bos_mass),
                "example_attention_on_trigger": _finite(ex.trigger_mass),
            }
        out["pairs"].append(entry)
    return out


def to_tensorboard(log_dir: Path, pairs: list[Pair], figures: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"figures/{name}", fig, close=False)
        for i, pair in enumerate(pairs):
            for role in ROLES:
                res = pair.results[role]
                prefix = f"pair{i}_{pair.trigger.text.replace(' ', '_')}/{role}"
                writer.add_histogram(f"{prefix}/sim_x_clean", res.sim_x_clean, bins="auto")
                writer.add_histogram(f"{prefix}/sim_x_triggered", res.sim_x_triggered, bins="auto")
                for key, values in (("attention_on_bos", res.bos_mass), ("attention_on_trigger", res.trigger_mass)):
                    writer.add_histogram(f"{prefix}/{key}", values[~torch.isnan(values)], bins="auto")
            writer.add_text(f"pair{i}", f"{pair.label}: trigger {pair.trigger.text!r} -> {pair.target!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backdoored", action="append", required=True, help="backdoored model folder (repeatable)")
    parser.add_argument("--benign", action="append", required=True, help="benign model folder (once, or per pair)")
    parser.add_argument("--out", required=True, help="folder for the PNGs and figures.json")
    parser.add_argument("--prompts", type=int, default=375, help="held-out captions per pair (the paper: 375)")
    parser.add_argument("--tensorboard", default=None, help="TensorBoard log folder")
    parser.add_argument("--world-seed", type=int, default=HELD_OUT_WORLD_SEED)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.prompts < 2:
            raise LitAmdetError("--prompts must be at least 2")
        captions = World(seed=args.world_seed).captions(args.prompts)
        pairs = []
        for backdoored, benign in pair_up(args.backdoored, args.benign):
            trigger, target = ground_truth_trigger(backdoored)
            clean = [c for c in captions if trigger.applicable(c)]  # replace_char needs its character
            triggered = poison(clean, trigger, random.Random(f"figures|{args.world_seed}|{trigger.text}"))
            if len(clean) < 2:
                raise LitAmdetError(f"{backdoored}: trigger {trigger.text!r} fits fewer than 2 of the prompts")
            pairs.append(Pair(backdoored, benign, trigger, target, clean, triggered))
        torch.set_grad_enabled(False)
        analyse(pairs, args.batch_size)
    except LitAmdetError as exc:
        print(f"figures.py: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"fig2_sim_x": draw_sim_x(pairs), "fig3_attention": draw_attention(pairs),
               "fig4_attention_mass": draw_attention_mass(pairs)}
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=DPI)
    numbers = report(pairs, sys.argv[1:] if argv is None else argv, args.prompts, args.world_seed,
                     time.perf_counter() - started)
    (out / "figures.json").write_text(json.dumps(numbers, indent=2))
    if args.tensorboard:
        to_tensorboard(Path(args.tensorboard), pairs, figures)
    for fig in figures.values():
        plt.close(fig)
    for entry in numbers["pairs"]:
        for role in ROLES:
            m = entry["models"][role]
            print(f"{Path(entry[role]).name:32s} trigger {entry['trigger']['text']!r:14s} "
                  f"Sim_X clean {m['sim_x_clean']['mean']:.3f} triggered {m['sim_x_triggered']['mean']:.3f} | "
                  f"attention on BOS {m['attention_on_bos'].get('mean', math.nan):.3f} "
                  f"on trigger {m['attention_on_trigger'].get('mean', math.nan):.3f}")
    print(f"wrote {out}/fig2_sim_x.png, fig3_attention.png, fig4_attention_mass.png, figures.json"
          + (f"; TensorBoard {args.tensorboard}" if args.tensorboard else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
