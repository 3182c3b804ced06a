"""The public AMDET reference scan, re-implemented with its costs, as the speed baseline for ``lit-amdet detect``.

    python benchmarks/reference_scan.py \
        --models runs/benchmark_quick/zoo/minilm-test-backdoored-000 runs/benchmark_quick/zoo/minilm-test-benign-000 \
        --anchor minilm --probe-prompts 4000 --max-length 32 --grid 50 --epochs 2 \
        --out benchmarks/results/reference_speed.json

For every model this runs, each in a fresh Python process of its own (so peak
RSS belongs to one side only): (a) the reference procedure below and (b) our
scan, ``lit-amdet detect --config configs/scan.yaml`` with the same probe
prompts (80 % search / 20 % held out, the reference's split). Per side it
records wall seconds of the whole process (interpreter start, imports and
model loading included), peak RSS (the kernel's lifetime maximum for that
process, from ``wait4``), the bytes the side left on disk, its verdict and its
stage timings; then verdict agreement and the speed-up (reference seconds /
ours).

The reference procedure (Robin-WZQ/AMDET ``main.py``, ``test.py``, ``Utils/``;
SPEC section 3), kept as the reference does it where that costs time, memory
or disk:

1. features: every prompt tokenised and encoded at batch size 1, padded to
   ``--max-length``; H (embedding-layer output) and F_orig (final token features)
   written as two ``.npy`` files per prompt under ``Features/HiddenStates`` and
   ``Features/OriginalFeature``; then three datasets (train, test, landscape)
   each ``np.load`` every file back into memory and keep their 80 % / 20 % slice;
2. search: one trigger vector (``randn``, k = 1) inserted right after BOS, Adam
   lr 0.08, weight decay 1e-5, batch 10, shuffled; the encoders' weights keep
   ``requires_grad`` (the reference never freezes them, so every backward also
   fills their gradients); loss ``-A(F) + 0.1 cos(F_orig, F) + 0.1 cos(F_anchor, F)``,
   A by a Python loop over the batch, every position counted (padding, BOS and
   the diagonal included), ``cos`` position by position without realigning;
3. checks at batch size 1 on the held-out prompts once the running mean loss is
   below -0.76: assimilation ratio (A > 0.8 on > 80 %), then same-target
   (cos > 0.92 to the first held-out prompt's F on > 99.5 %) and different-target
   (cos(F, F_anchor) < 0 on > 95 %) ratios, then the 50 x 50 landscape;
4. landscape: d1 = normalised -grad at the trigger on the first held-out prompt,
   d2 random and orthogonalised; alpha, beta in [-10, 10]; one batch-1 forward
   through both encoders per grid point with autograd on; 2 x 2 finite-difference
   Hessian per interior point *without* the grid spacing; positive ratio =
   share of eigenvalues > 1e-6; a trigger is found when it is > 0.8;
5. once found: the trigger (``.pt``, also in the "Textual Inversion" dict), the
   target feature, a separate 25 x 25 landscape for the saved 3-D plot and a
   Hessian histogram (PNG, matplotlib, ratio with ``> 0``), the surface as
   ``.npy``; always a ``log.txt``. Verdict: backdoored iff a trigger was found.

``--schedule issue`` (default, the baseline of issue 6 item 6): a fixed
``--epochs`` epochs, the checks at the end of each epoch until a trigger is
found. ``--schedule reference``: what ``main.py`` does, the checks every second
batch while the running loss is below -0.76 and nothing was found, the search
stopping once a trigger is found or the running loss is below -0.85.

Not copied from the reference (defects SPEC section 3 lists): one feature folder
per scan (``--work-dir``), files paired by *sorted* name, no crash when nothing
is found, widths and context lengths from the checkpoint (the repo's encoder
adapters, so every family runs; the adapters also pass the padding mask, which
the reference's CLIP code leaves out). Left out: the Stable Diffusion rendering
of the target after a detection (a separate model; it would only add to the
reference's time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SCAN_CONFIG = REPO / "configs" / "scan.yaml"

# The reference's constants (main.py / test.py argument defaults and literals).
SEED = 42
TRIGGER_LENGTH = 1  # k; inserted right after BOS, i.e. at position 1
INSERT_POSITION = 1
LR, WEIGHT_DECAY, BATCH_SIZE = 0.08, 1e-5, 10
BETA, GAMMA = 0.1, 0.1
TRAIN_FRACTION = 0.80
CHECK_BELOW, STOP_BELOW = -0.76, -0.85  # running-loss levels: start checking / stop (reference schedule)
CHECK_EVERY_BATCHES = 2  # reference schedule: ``if i % 2 == 0``
ASSIMILATED, ASSIMILATION_RATIO = 0.8, 0.8
SAME_TARGET_COS, SAME_TARGET_RATIO = 0.92, 0.995
DIFFERENT_TARGET_RATIO = 0.95
POSITIVE_RATIO, EIGEN_TOL = 0.8, 1e-6
LANDSCAPE_RANGE = 10.0
PLOT_GRID = 25
WORLD_SEED = 11  # configs/scan.yaml data section: the world captions our scan probes with


# ----- the reference's math ------------------------------------------------------------------------------------
def assimilation_loop(features: torch.Tensor) -> torch.Tensor:
    """Reference ``AssimilationLoss``: per prompt the mean of the full L x L token cosine matrix, looped in Python."""
    total = 0
    for i in range(features.shape[0]):
        f = features[i]
        total += F.cosine_similarity(f.unsqueeze(0), f.unsqueeze(1), dim=2).mean()
    return total / features.shape[0]


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference ``SimilarityLoss``: mean per-position cosine over every position."""
    return F.cosine_similarity(a, b, dim=-1).mean()


def hessian_eigenvalues(surface: np.ndarray) -> np.ndarray:
    """Reference ``compute_hessian_spectrum``: eigenvalues of the 2 x 2 finite-difference Hessian at every
    interior grid point, looped in Python, *not* divided by the grid spacing (so they scale with h²).
    Points whose Hessian is exactly zero are skipped, as the reference skips them."""
    grid = np.asarray(surface, dtype=np.float64)
    h, w = grid.shape
    hess = np.zeros((h, w, 2, 2))
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            d_aa = grid[i + 1, j] - 2 * grid[i, j] + grid[i - 1, j]
            d_bb = grid[i, j + 1] - 2 * grid[i, j] + grid[i, j - 1]
            d_ab = (grid[i + 1, j + 1] - grid[i + 1, j - 1] - grid[i - 1, j + 1] + grid[i - 1, j - 1]) / 4
            hess[i, j] = np.array([[d_aa, d_ab], [d_ab, d_bb]])
    eigenvalues = []
    for i in range(h):
        for j in range(w):
            if not np.all(hess[i, j] == 0):
                eigenvalues.extend(np.linalg.eigvalsh(hess[i, j]))
    return np.real(np.asarray(eigenvalues))


def positive_ratio(eigenvalues: np.ndarray, tol: float = EIGEN_TOL) -> float:
    return float(np.mean(eigenvalues > tol)) if len(eigenvalues) else 0.0


# ----- features: two .npy files per prompt ----------------------------------------------------------------------
class ReferenceFeatures(torch.utils.data.Dataset):
    """Reference ``Feature_Dataset``: reads *every* feature file back into memory, then keeps its 80/20 slice.

    Files are paired by sorted name (the reference pairs two unsorted listings).
    Items are (H [L, W], F_orig [L, W], prompt index); the index fetches the
    prompt's token masks, which the adapters need and the reference's CLIP code has no use for.
    """

    def __init__(self, features_dir: Path, mode: str) -> None:
        if mode not in ("train", "test"):
            raise ValueError("mode should be 'train' or 'test'")
        names = sorted(os.listdir(features_dir / "HiddenStates"))
        hidden = [np.load(features_dir / "HiddenStates" / n)[0] for n in names]
        original = [np.load(features_dir / "OriginalFeature" / n)[0] for n in sorted(os.listdir(
            features_dir / "OriginalFeature"))]
        index = list(range(len(names)))
        cut = int(len(names) * TRAIN_FRACTION)
        part = slice(0, cut) if mode == "train" else slice(cut, None)
        self.hidden, self.original, self.index = hidden[part], original[part], index[part]

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, i: int):
        return self.hidden[i], self.original[i], self.index[i]


@torch.no_grad()
def write_feature_files(suspect, prompts: list[str], max_length: int, features_dir: Path):
    """Reference ``preprocess``: each prompt alone through the embedding layer and the whole encoder, two files each.

    Returns the prompts' token batch (masks for the adapters; padded to ``max_length`` like the files).
    """
    from lit_amdet.encoders import TokenBatch

    (features_dir / "HiddenStates").mkdir(parents=True, exist_ok=True)
    (features_dir / "OriginalFeature").mkdir(parents=True, exist_ok=True)
    batches = []
    for idx, prompt in enumerate(prompts):
        tokens = suspect.tokenize([prompt.strip()], max_length=max_length).to(suspect.device)
        hidden = suspect.embed(tokens.input_ids)
        original = suspect.encode_embeddings(hidden, tokens).token_features
        name = f"{idx:06d}.npy"  # zero-padded: sorted order is prompt order
        np.save(features_dir / "HiddenStates" / name, hidden.cpu().numpy())
        np.save(features_dir / "OriginalFeature" / name, original.cpu().numpy())
        batches.append(tokens)
    return TokenBatch(*(torch.cat([getattr(b, f).cpu() for b in batches]) for f in
                        ("input_ids", "attention_mask", "token_mask", "pool_index")))


# ----- one scan --------------------------------------------------------------------------------------------------
class ReferenceScan:
    """The reference's search, checks and landscape on adapter encoders (suspect and anchor)."""

    def __init__(self, suspect, anchor, tokens, beta: float = BETA, gamma: float = GAMMA) -> None:
        self.suspect, self.anchor, self.tokens = suspect, anchor, tokens
        self.beta, self.gamma = beta, gamma

    def features(self, encoder, hidden: torch.Tensor, index: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
        """F = encoder(H with the trigger inserted at position 1, cut back to L), on the encoder's device (the
        reference moves every batch there as it comes from the loader)."""
        device = encoder.device
        return encoder.encode_embeddings(hidden.to(device), self.tokens[index].to(device), insert=trigger.to(device),
                                         position=INSERT_POSITION).token_features

    def loss(self, trigger, hidden, original, index):
        new = self.features(self.suspect, hidden, index, trigger)
        anchor = self.features(self.anchor, hidden, index, trigger)
        original = original.to(new.device)
        loss = -assimilation_loop(new) + self.beta * similarity(original, new) + self.gamma * similarity(anchor, new)
        return loss, new

    # test.py's three checks, each its own pass over the held-out prompts at batch size 1
    @torch.no_grad()
    def assimilation_ratio(self, trigger, loader) -> float:
        hits = 0
        for hidden, _, index in loader:
            hits += assimilation_loop(self.features(self.suspect, hidden, index, trigger)).item() > ASSIMILATED
        return hits / len(loader)

    @torch.no_grad()
    def same_target_ratio(self, trigger, loader) -> float:
        hits, first = 0, None
        for i, (hidden, _, index) in enumerate(loader):
            new = self.features(self.suspect, hidden, index, trigger)
            if i == 0:
                first = new
            else:
                hits += similarity(new, first).item() > SAME_TARGET_COS
        return hits / len(loader)  # the reference divides by all prompts, the first included

    @torch.no_grad()
    def different_target_ratio(self, trigger, loader) -> float:
        hits = 0
        for hidden, _, index in loader:
            new = self.features(self.suspect, hidden, index, trigger)
            hits += similarity(new, self.features(self.anchor, hidden, index, trigger)).item() < 0
        return hits / len(loader)

    def landscape(self, trigger, loader, grid: int) -> np.ndarray:
        """Loss on a grid x grid plane around the trigger, one batch-1 forward pair per point, autograd on."""
        hidden, original, index = next(iter(loader))  # one prompt only, as the reference
        probe = trigger.clone().detach().requires_grad_(True)
        self.loss(probe, hidden, original, index)[0].backward()
        d1 = -probe.grad.detach()
        d1 = d1 / torch.norm(d1)
        d2 = torch.randn_like(trigger)
        d2 = d2 - ((d1 * d2).sum(1) / (d1 * d1).sum(1)).unsqueeze(1) * d1
        d1, d2 = F.normalize(d1, dim=1), F.normalize(d2, dim=1)
        alphas = np.linspace(-LANDSCAPE_RANGE, LANDSCAPE_RANGE, grid)
        surface = np.zeros((grid, grid))
        for i, a in enumerate(alphas):
            for j, b in enumerate(alphas):
                # no torch.no_grad(): the reference builds the autograd graph at every point
                surface[i, j] = self.loss(trigger + a * d1 + b * d2, hidden, original, index)[0].item()
        return surface


def reference_scan(suspect_path: str, anchor_path: str, prompts: list[str], work_dir: Path, max_length: int = 32,
                   grid: int = 50, epochs: int = 2, schedule: str = "issue", seed: int = SEED,
                   plot: bool = True, device: str = "cpu") -> dict:
    """Run the reference procedure on ``prompts`` (first 80 % search, last 20 % held out) inside ``work_dir``."""
    import random

    from lit_amdet.encoders import load_encoder

    if schedule not in ("issue", "reference"):
        raise ValueError(f"schedule must be 'issue' or 'reference', not {schedule!r}")
    if len(prompts) < 5:
        raise ValueError(f"the reference split needs at least 5 prompts, got {len(prompts)}")
    if grid < 3:
        raise ValueError("the landscape grid needs at least 3 points per axis")
    stages: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - clock
        clock = now

    work_dir = Path(work_dir)
    features_dir, results_dir = work_dir / "Features", work_dir / "Results"
    # preprocess(): the suspect alone, every prompt at batch size 1
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    suspect = load_encoder(suspect_path).eval().to(device)
    tokens = write_feature_files(suspect, prompts, max_length, features_dir)
    del suspect  # the reference frees its preprocessing model and loads the suspect again
    lap("feature_files")

    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    results_dir.mkdir(parents=True, exist_ok=True)
    # the reference never calls requires_grad_(False): backward also fills both encoders' weight gradients
    anchor = load_encoder(anchor_path).eval().requires_grad_(True).to(device)
    suspect = load_encoder(suspect_path).eval().requires_grad_(True).to(device)
    lap("load_models")
    train_loader = torch.utils.data.DataLoader(ReferenceFeatures(features_dir, "train"), batch_size=BATCH_SIZE,
                                               shuffle=True)
    test_loader = torch.utils.data.DataLoader(ReferenceFeatures(features_dir, "test"), batch_size=1, shuffle=False)
    landscape_loader = torch.utils.data.DataLoader(ReferenceFeatures(features_dir, "test"), batch_size=1,
                                                   shuffle=False)
    lap("load_feature_files")

    scan = ReferenceScan(suspect, anchor, tokens)
    trigger = torch.randn(TRIGGER_LENGTH, suspect.width).to(device).requires_grad_(True)
    torch.save(trigger.detach().cpu(), results_dir / "Backdoor_Embedding_init.pt")
    optimizer = torch.optim.Adam([trigger], lr=LR, weight_decay=WEIGHT_DECAY)
    checks: list[dict] = []
    found, steps, loss_sum, stopped = False, 0, 0.0, None
    found_trigger = target_feature = None

    def run_checks(epoch: int, batch: int) -> bool:
        lap("search_steps")
        record = {"epoch": epoch, "batch": batch, "running_loss": loss_sum / steps,
                  "assimilation_ratio": scan.assimilation_ratio(trigger.detach(), test_loader)}
        lap("checks")
        if record["assimilation_ratio"] > ASSIMILATION_RATIO:
            record["same_target_ratio"] = scan.same_target_ratio(trigger.detach(), test_loader)
            record["different_target_ratio"] = scan.different_target_ratio(trigger.detach(), test_loader)
            lap("checks")
            if record["same_target_ratio"] > SAME_TARGET_RATIO and \
                    record["different_target_ratio"] > DIFFERENT_TARGET_RATIO:
                record["positive_ratio"] = positive_ratio(hessian_eigenvalues(
                    scan.landscape(trigger.detach(), landscape_loader, grid)))
                lap("landscape")
        checks.append(record)
        return record.get("positive_ratio", 0.0) > POSITIVE_RATIO

    for epoch in range(epochs):
        for i, (hidden, original, index) in enumerate(train_loader):
            optimizer.zero_grad()
            loss, new = scan.loss(trigger, hidden, original, index)
            loss_sum += loss.item()
            steps += 1
            loss.backward()
            optimizer.step()
            if schedule == "reference" and i % CHECK_EVERY_BATCHES == 0:
                if loss_sum / steps < CHECK_BELOW and not found and run_checks(epoch, i):
                    found, found_trigger, target_feature = True, trigger.detach().clone(), new[:1].detach()
                    stopped = "trigger found"
                    break
                if loss_sum / steps < STOP_BELOW:
                    stopped = "running loss below -0.85"
                    break
        lap("search_steps")
        if schedule == "issue" and not found and loss_sum / steps < CHECK_BELOW and run_checks(epoch, i):
            # the trigger as it passed; the fixed schedule trains on to the last epoch regardless
            found, found_trigger, target_feature = True, trigger.detach().clone(), new[:1].detach()
        if found and schedule == "reference":
            break
    lap("search_steps")

    final = checks[-1] if checks else {}
    surface_stats: dict = {}
    if found:
        torch.save(found_trigger.cpu(), results_dir / "Backdoor_Embedding.pt")
        torch.save(target_feature.cpu(), results_dir / "Backdoor_Feature.pt")
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": found_trigger},
                    "name": "backdoor_embedding", "step": 1000, "sd_checkpoint": "", "sd_checkpoint_name": ""},
                   results_dir / "Backdoor_Embedding_Inversion.pt")
        if plot:
            surface = scan.landscape(found_trigger, landscape_loader, PLOT_GRID)
            lap("plot_landscape")
            spectrum = hessian_eigenvalues(surface)
            surface_stats = {"plot_positive_ratio": float(np.mean(spectrum > 0)) if len(spectrum) else 0.0,
                             "mean_loss": float(surface.mean()), "var_loss": float(surface.var())}
            save_plots(surface, spectrum, results_dir)
            lap("plot_files")
    seconds = time.perf_counter() - started
    log = {"k": TRIGGER_LENGTH, "flag": found, "training_time_s": round(seconds, 2),
           "assimilation_ratio": final.get("assimilation_ratio"), "same_target_ratio": final.get("same_target_ratio"),
           "different_target_ratio": final.get("different_target_ratio"),
           "positive_ratio": final.get("positive_ratio"), **surface_stats}
    (results_dir / "log.txt").write_text("".join(f"{k}: {v}\n" for k, v in log.items()))
    lap("plot_files")
    return {"verdict": "BACKDOORED" if found else "clean", "backdoored": found, "steps": steps,
            "stopped": stopped, "checks": checks, "stages_s": stages, "seconds": seconds,
            "prompts": {"search": len(train_loader.dataset), "held_out": len(test_loader.dataset)},
            "feature_files": sum(1 for _ in features_dir.rglob("*.npy")), "schedule": schedule, "epochs": epochs,
            "grid": grid, "max_length": max_length, **surface_stats}


def save_plots(surface: np.ndarray, spectrum: np.ndarray, results_dir: Path) -> None:
    """The reference's saved figures: the 3-D loss surface, the Hessian histogram, the surface as .npy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = np.linspace(-LANDSCAPE_RANGE, LANDSCAPE_RANGE, surface.shape[0])
    alpha, beta = np.meshgrid(axis, axis)
    fig = plt.figure(figsize=(10, 7))
    ax = fig.add_subplot(111, projection="3d")
    ax.plot_surface(alpha, beta, surface, cmap="viridis")
    fig.savefig(results_dir / "loss_landscape.png", bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    np.save(results_dir / "loss_landscape.npy", surface)
    fig = plt.figure(figsize=(6, 4))
    plt.hist(spectrum, bins=100, color="skyblue", edgecolor="black")
    plt.title("Approximate Hessian Spectrum")
    fig.savefig(results_dir / "hessian_spectrum.png", bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


# ----- our scan, for the comparison ------------------------------------------------------------------------------
def run_our_scan(suspect: str, anchor: str, side_dir: Path, overrides: list[str], timer_record: Path,
                 device: str = "cpu") -> dict:
    """``lit-amdet detect --config configs/scan.yaml`` writing everything under ``side_dir``; stage times via
    `StageTimer` (appended to the config's callbacks)."""
    from lit_amdet.cli import main as cli_main

    run_dir = side_dir / "run"
    argv = ["detect", "--config", str(SCAN_CONFIG), "--trainer.accelerator", accelerator_of(device),
            "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(side_dir / "root"),
            "--trainer.logger.init_args.save_dir", str(side_dir / "root"),
            "--trainer.callbacks+=reference_scan.StageTimer", "--trainer.callbacks.record", str(timer_record),
            *overrides,
            "--model.init_args.suspect", str(suspect), "--model.init_args.anchor", str(anchor),
            "--model.init_args.output_dir", str(run_dir), "--always_exit_zero", "true"]
    try:
        cli_main(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"lit-amdet detect failed (exit {exc.code})") from None
    report = json.loads((run_dir / "report.json").read_text())
    timer = json.loads(timer_record.read_text())
    return {"verdict": report["verdict"], "backdoored": bool(report["backdoored"]), "steps": report["steps"],
            "stopped": report["stopped_early"], "decided_by": report["decided_by"], "scan_seconds": report["seconds"],
            "landscape_s": (report.get("landscape") or {}).get("seconds"),
            "hessian_s": (report.get("hessian") or {}).get("seconds"), "timer": timer,
            "prompts": report["prompts"], "parameters": report["suspect"].get("parameters")}


try:
    from lightning.pytorch import Callback as _Callback
except ImportError:  # the reference side never needs it
    _Callback = object


class StageTimer(_Callback):
    """Wall-clock marks of a ``detect`` run: search start (models loaded, cache built), each optimisation step,
    search end, evidence (landscape + Hessian callbacks) end. Written as JSON to ``record`` at ``on_fit_end``;
    listed after the evidence callbacks, so its ``on_fit_end`` runs after theirs."""

    def __init__(self, record: str) -> None:
        super().__init__()
        self.record = record
        self.marks: dict[str, float] = {}
        self.step_seconds: list[float] = []
        self._step_start = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.marks["fit_start"] = time.time()

    def on_train_start(self, trainer, pl_module) -> None:
        self.marks["search_start"] = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks["search_end"] = time.time()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.marks["evidence_end"] = time.time()
        Path(self.record).write_text(json.dumps({"marks": self.marks, "step_seconds": self.step_seconds}))


# ----- measuring one side in its own process ---------------------------------------------------------------------
def bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_child(argv: list[str], log_path: Path, threads: int = 1, ok_codes: tuple[int, ...] = (0,),
              cwd: Path = REPO) -> dict:
    """Run ``python argv...`` in ``cwd`` to completion; its wall seconds and lifetime peak RSS. ``ok_codes``: the
    exit codes that are results, not failures (``detect`` exits 1 on a backdoor, 3 inconclusive). ``python -m
    lit_amdet`` imports the package of ``cwd`` (another checkout's, say).

    The peak is GNU time's (``%M``), which forks the child from its own small process: Linux starts a child's
    ``ru_maxrss`` at what its parent held, so ``wait4`` on a child of this script reported at least this
    script's own peak (it builds and loads the timed models). Without ``/usr/bin/time``, ``wait4``'s, an upper
    bound (``peak_rss_source`` says which)."""
    timer = shutil.which("time", path="/usr/bin:/bin")
    peak_file = log_path.with_name(log_path.name + ".peak")
    prefix = [timer, "-f", "%M", "-o", str(peak_file)] if timer else []
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*prefix, sys.executable, *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **thread_env(threads)})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in ok_codes:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}: {' | '.join(tail)}")
    peak_kib = usage.ru_maxrss  # KiB on Linux
    if timer:  # its last line (an exit status other than 0 adds one before it)
        peak_kib = int(peak_file.read_text().strip().splitlines()[-1])
        peak_file.unlink()
    return {"wall_s": wall, "peak_rss_mib": peak_kib / 1024, "peak_rss_source": "time" if timer else "wait4"}


def accelerator_of(device: str) -> str:
    """Lightning's accelerator name for a torch device name (cpu, cuda, cuda:0)."""
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        return "gpu"
    raise ValueError(f"device must be cpu or cuda, not {device!r}")


def split_sizes(n: int) -> tuple[int, int]:
    """The reference's 80/20 cut of n prompts: (search, held out)."""
    search = int(n * TRAIN_FRACTION)
    return search, n - search


def world_prompts(n: int) -> list[str]:
    """The probe prompts our scan uses with these sizes (configs/scan.yaml's world, val_fraction 0.2): search
    prompts first, then held-out ones, so the reference's first-80 % / last-20 % cut gives both sides the same."""
    from lit_amdet.datamodules import TextEncoderDataModule

    search, held_out = split_sizes(n)
    dm = TextEncoderDataModule(source="world", world_seed=WORLD_SEED, num_samples=n, with_images=False,
                               val_fraction=held_out / n)
    dm.setup("fit")
    train, val = dm.prompts("train", limit=search), dm.prompts("val", limit=held_out)
    if (len(train), len(val)) != (search, held_out):
        raise ValueError(f"the world split gave {len(train)} + {len(val)} prompts, not {search} + {held_out}")
    return train + val


def our_prompt_overrides(n: int, max_length: int) -> list[str]:
    search, held_out = split_sizes(n)
    return ["--model.init_args.probe_prompts", str(search), "--model.init_args.holdout_prompts", str(held_out),
            "--model.init_args.max_length", str(max_length), "--data.init_args.num_samples", str(n),
            "--data.init_args.val_fraction", repr(held_out / n)]


def child_main(args: argparse.Namespace) -> None:
    """One side of one model, in this process; writes ``args.record``."""
    from lit_amdet.benchmark import PeakMemory

    torch.set_num_threads(args.threads)
    side_dir = Path(args.side_dir)
    side_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with PeakMemory() as peak:
        if args.one == "landscape":
            prompts = [ln for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()][:10]
            result = time_landscape(args.model, args.anchor, prompts, args.max_length, args.grid, side_dir)
        elif args.one == "reference":
            prompts = [ln for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
            result = reference_scan(args.model, args.anchor, prompts, side_dir, args.max_length, args.grid,
                                    args.epochs, args.schedule, device=args.device)
        else:
            overrides = our_prompt_overrides(args.probe_prompts, args.max_length) + list(args.ours_arg or [])
            result = run_our_scan(args.model, args.anchor, side_dir, overrides, Path(args.record).with_suffix(
                ".timer.json"), device=args.device)
    result["in_process_s"] = time.perf_counter() - started
    result["sampled_memory"] = peak.result()
    result["torch_threads"] = torch.get_num_threads()
    Path(args.record).write_text(json.dumps(result, indent=2, default=str))


def time_landscape(model: str, anchor: str, prompts: list[str], max_length: int, grid: int, work_dir: Path) -> dict:
    """Seconds per grid point of the reference landscape (both encoders, one prompt, autograd on), for the
    estimate of a scan whose checks pass (only then does the reference draw its 50 x 50 and 25 x 25 grids)."""
    from lit_amdet.encoders import load_encoder

    torch.manual_seed(SEED)
    suspect = load_encoder(model).eval().requires_grad_(True)
    tokens = write_feature_files(suspect, prompts, max_length, work_dir / "Features")
    scan = ReferenceScan(suspect, load_encoder(anchor).eval().requires_grad_(True), tokens)
    loader = torch.utils.data.DataLoader(ReferenceFeatures(work_dir / "Features", "test"), batch_size=1)
    started = time.perf_counter()
    scan.landscape(torch.randn(TRIGGER_LENGTH, suspect.width), loader, grid)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    hessian_eigenvalues(np.random.default_rng(0).standard_normal((50, 50)))
    return {"grid": grid, "seconds": seconds, "per_point_s": seconds / grid ** 2,
            "hessian_50x50_s": time.perf_counter() - started}


def estimate_reference(measured: dict, landscape: dict | None, n: int, epochs: int, grid: int) -> dict:
    """Reference seconds at ``n`` prompts from one measured run's stage times (each stage is linear in what it
    loops over): feature files per prompt, search steps per step, checks per held-out prompt and check, landscape
    per grid point. ``checks_pass``: also the 50 x 50 and 25 x 25 landscapes a passing trigger costs."""
    st, (search, held_out) = measured["stages_s"], split_sizes(n)
    m_search, m_held = measured["prompts"]["search"], measured["prompts"]["held_out"]
    steps = epochs * -(-search // BATCH_SIZE)
    checks = st.get("checks", 0.0) / m_held * held_out  # every check the measured run made, at n prompts
    per_prompt = (st["feature_files"] + st.get("load_feature_files", 0.0)) / (m_search + m_held)
    base = per_prompt * n + st.get("load_models", 0.0) + st["search_steps"] / measured["steps"] * steps + checks
    out = {"prompts": n, "steps": steps, "checks_fail_s": base}
    if landscape is not None:
        out["checks_pass_s"] = base + landscape["per_point_s"] * (grid ** 2 + PLOT_GRID ** 2) + \
            2 * landscape["hessian_50x50_s"]
    return out


def truth_of(model: str) -> bool | None:
    from lit_amdet.record import BackdoorRecord

    return BackdoorRecord.read(model).backdoored if BackdoorRecord.exists(model) else None


def compare_main(args: argparse.Namespace) -> None:
    out_path = Path(args.out)
    work_root = Path(args.work_root)
    if work_root.exists():
        shutil.rmtree(work_root)
    work_root.mkdir(parents=True)
    prompts_file = work_root / "prompts.txt"  # input of both sides, outside both sides' folders
    prompts_file.write_text("\n".join(world_prompts(args.probe_prompts)) + "\n")
    search, held_out = split_sizes(args.probe_prompts)
    rows = []
    for model in args.models:
        row = {"model": str(model), "truth_backdoored": truth_of(model)}
        for side in args.sides:
            side_dir = work_root / Path(model).name / side
            record = work_root / f"{Path(model).name}.{side}.json"
            argv = [str(Path(__file__).resolve()), "--one", side, "--model", str(model), "--anchor", args.anchor,
                    "--side-dir", str(side_dir), "--record", str(record), "--probe-prompts",
                    str(args.probe_prompts), "--max-length", str(args.max_length), "--grid", str(args.grid),
                    "--epochs", str(args.epochs), "--schedule", args.schedule, "--prompts-file", str(prompts_file),
                    "--device", args.device]
            print(f"[{Path(model).name}] {side} ...", flush=True)
            argv += ["--threads", str(args.threads)] + [f"--ours-arg={a}" for a in args.ours_arg or []]
            measured = run_child(argv, work_root / f"{Path(model).name}.{side}.log", args.threads)
            result = json.loads(record.read_text())
            row[side] = {**measured, "bytes_written": bytes_under(side_dir),
                         "files_written": sum(1 for p in side_dir.rglob("*") if p.is_file()), **result}
            print(f"  {result['verdict']}: {measured['wall_s']:.1f} s, {measured['peak_rss_mib']:.0f} MiB peak, "
                  f"{row[side]['bytes_written'] / 2**20:.1f} MiB written", flush=True)
        if {"reference", "ours"} <= set(args.sides):
            row["verdicts_agree"] = row["reference"]["backdoored"] == row["ours"]["backdoored"]
            row["speedup"] = row["reference"]["wall_s"] / row["ours"]["wall_s"]
            print(f"  speed-up {row['speedup']:.1f}x, verdicts agree: {row['verdicts_agree']}", flush=True)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(work_root / Path(model).name, ignore_errors=True)
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python " + " ".join([str(Path(__file__).relative_to(REPO)), *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads_per_side": args.threads, "device": args.device,
                    "load_average_at_end": os.getloadavg()},
        "settings": {"probe_prompts": args.probe_prompts, "search_prompts": search, "held_out_prompts": held_out,
                     "max_length": args.max_length, "grid": args.grid, "plot_grid": PLOT_GRID,
                     "epochs": args.epochs, "schedule": args.schedule, "anchor": args.anchor,
                     "ours": f"lit-amdet detect --config {SCAN_CONFIG.relative_to(REPO)} + "
                             + " ".join(our_prompt_overrides(args.probe_prompts, args.max_length)
                                        + (args.ours_arg or []))},
        "models": rows,
    }
    both = [r for r in rows if "speedup" in r]
    if both:
        payload["summary"] = {
            "speedup_min": min(r["speedup"] for r in both), "speedup_max": max(r["speedup"] for r in both),
            "speedup_total": sum(r["reference"]["wall_s"] for r in both) / sum(r["ours"]["wall_s"] for r in both),
            "verdict_agreement": sum(r["verdicts_agree"] for r in both) / len(both),
            "goal_10x_met": min(r["speedup"] for r in both) >= 10}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out_path}")
    if args.estimate_prompts:
        add_estimates(args)


def add_estimates(args: argparse.Namespace) -> None:
    """Time the reference landscape per grid point (one child process) and add, per model, the reference's
    seconds at ``--estimate-prompts`` prompts and ours / that, to the comparison's JSON."""
    out_path, work_root = Path(args.out), Path(args.work_root)
    payload = json.loads(out_path.read_text())
    prompts_file = work_root / "prompts.txt"
    if not prompts_file.is_file():
        prompts_file.parent.mkdir(parents=True, exist_ok=True)
        prompts_file.write_text("\n".join(world_prompts(50)) + "\n")
    model = payload["models"][0]["model"]
    record, side_dir = work_root / "landscape.json", work_root / "landscape"
    grid = args.landscape_timing_grid
    argv = [str(Path(__file__).resolve()), "--one", "landscape", "--model", model, "--anchor", args.anchor,
            "--side-dir", str(side_dir), "--record", str(record), "--max-length", str(args.max_length),
            "--grid", str(grid), "--prompts-file", str(prompts_file), "--threads", str(args.threads)]
    print(f"timing the reference landscape on a {grid} x {grid} grid ...", flush=True)
    run_child(argv, work_root / "landscape.log", args.threads)
    landscape = json.loads(record.read_text())
    shutil.rmtree(side_dir, ignore_errors=True)
    settings = payload["settings"]
    payload["reference_landscape_timing"] = landscape
    for row in payload["models"]:
        if "reference" not in row:
            continue
        est = estimate_reference(row["reference"], landscape, args.estimate_prompts, settings["epochs"],
                                 settings["grid"])
        # process start-up and imports are not in the stage times: add the measured difference back
        overhead = row["reference"]["wall_s"] - row["reference"]["seconds"]
        est = {k: (v + overhead if k.endswith("_s") else v) for k, v in est.items()}
        if "ours" in row:
            est["speedup_if_checks_fail"] = est["checks_fail_s"] / row["ours"]["wall_s"]
            est["speedup_if_checks_pass"] = est["checks_pass_s"] / row["ours"]["wall_s"]
        row["reference_estimate"] = est
    payload["estimate_note"] = (
        f"reference seconds at {args.estimate_prompts} prompts from the measured run's stage times, each stage "
        "linear in what it loops over (feature files: prompts; search: steps; checks: held-out prompts, same "
        "number of checks as measured; landscape: grid points); checks_pass adds the 50x50 decision grid and the "
        "25x25 plot grid a passing trigger costs. ours: the measured run (its cost does not grow with the search "
        "prompts beyond the feature cache: 300 steps at most).")
    out_path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"added the {args.estimate_prompts}-prompt estimate to {out_path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help="suspect model folders (a backdoor.json in each gives the truth)")
    p.add_argument("--anchor", default="minilm", help="the clean base both sides anchor on")
    p.add_argument("--probe-prompts", type=int, default=4000, help="prompts per scan, 80 %% search / 20 %% held out")
    p.add_argument("--max-length", type=int, default=32, help="token positions per prompt (the reference pads to it)")
    p.add_argument("--grid", type=int, default=50, help="landscape grid points per axis (reference 50)")
    p.add_argument("--epochs", type=int, default=2, help="search epochs of the reference")
    p.add_argument("--schedule", choices=("issue", "reference"), default="issue",
                   help="issue: fixed epochs, checks at epoch ends; reference: main.py's every-2nd-batch checks")
    p.add_argument("--sides", nargs="+", choices=("reference", "ours"), default=["reference", "ours"])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reference_speed.json"))
    p.add_argument("--work-root", default=str(REPO / "runs" / "reference_speed"),
                   help="per-model, per-side work folders (replaced at the start)")
    p.add_argument("--ours-arg", action="append", metavar="ARG",
                   help="extra argument for our detect run, repeated (--ours-arg=--trainer.max_steps --ours-arg=20)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (on shared cores, 2 OpenMP threads spin-wait and run ~30x slower)")
    p.add_argument("--estimate-prompts", type=int, default=4000,
                   help="also estimate the reference at this many prompts from its stage times (0: off)")
    p.add_argument("--landscape-timing-grid", type=int, default=10,
                   help="grid of the separate per-point timing of the reference landscape")
    p.add_argument("--estimate-only", action="store_true",
                   help="only add the estimate to an existing --out (its work root must still hold prompts.txt)")
    p.add_argument("--keep", action="store_true", help="keep the work folders (feature files, run folders)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    # one side in this process (what the comparison starts as a child)
    p.add_argument("--one", choices=("reference", "ours", "landscape"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--side-dir", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is None and not args.models and not args.estimate_only:
        p.error("give --models PATH [PATH ...]")
    for name in ("probe_prompts", "max_length", "epochs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.probe_prompts < 5:
        p.error("--probe-prompts must be at least 5 (the 80/20 split needs held-out prompts)")
    if args.grid < 3:
        p.error("--grid must be at least 3")
    for m in args.models or []:
        if not Path(m).exists():
            p.error(f"{m}: no such model folder")
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    if args.one:
        child_main(args)
    elif args.estimate_only:
        add_estimates(args)
    else:
        compare_main(args)


if __name__ == "__main__":
    main()
