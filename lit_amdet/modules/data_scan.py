"""Find backdoor-poisoned pairs in an image-caption data set (SPEC §4; Huang et al., ICLR 2025).

Poisoned pairs have sparse local neighbourhoods in the embedding space of the
CLIP trained on them. `SampleEmbedding` embeds every pair with that model
(``lit-amdet scan_data`` runs it through ``Trainer.predict``, see `run_scan`);
`score_and_report` then scores the whole set with the exact, global kNN
detectors of `lit_amdet.outliers` and writes ``scores.csv``, figures and
``report.json`` (ROC-AUC, PR-AUC and FPR@95%TPR when poison labels are known).
`score_and_report` needs no Lightning, so cached embeddings can be re-scored.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_amdet.errors import ConfigError, LitAmdetError
from lit_amdet.modules.base import EncoderTask
from lit_amdet.outliers import DETECTORS, check_reference_size, clip_score, score_samples
from lit_amdet.poisoning import load_labels

Modality = Literal["image", "text", "both"]
MODALITIES = ("image", "text", "both")
EMBEDDINGS = "embeddings.safetensors"


class SampleEmbedding(EncoderTask):
    """Per-sample embeddings of an image-caption data set, for `score_and_report`.

    Args:
        encoder: checkpoint of the (possibly backdoored) CLIP-like model trained on the data.
        modality: what the detectors see: ``image``, ``text`` or ``both`` (the concatenation of
            the L2-normalised image and text embeddings, as in the paper).
        allow_pickle: allow loading a checkpoint that needs unpickling.
    """

    def __init__(self, encoder: str, modality: Modality = "both", allow_pickle: bool = False) -> None:
        super().__init__()

    def configure_models(self) -> None:
        hp = self.hparams
        if hp.modality not in MODALITIES:
            raise ConfigError(f"modality must be one of {', '.join(MODALITIES)} (got {hp.modality!r})")
        self.encoder = self.open_encoder(hp.encoder, None, hp.allow_pickle)
        self.encoder.eval().requires_grad_(False)
        if hp.modality != "text" and not self.encoder.has_image_tower:
            raise ConfigError(f"modality {hp.modality!r} needs an image tower; {self.encoder.name} "
                              f"({self.encoder.family}) has none (use modality: text)")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        # Moved to CPU per batch: the whole set's embeddings would not fit next to the model on the GPU.
        out: dict[str, Any] = {"index": batch["index"].cpu(), "caption": list(batch["text"])}
        out["text"] = F.normalize(self.encoder.encode(batch["tokens"]).pooled.float(), dim=-1).cpu()
        if "pixel_values" in batch:  # also for modality text: the clip-score baseline needs both towers
            out["image"] = F.normalize(self.encoder.encode_image(batch["pixel_values"]).float(), dim=-1).cpu()
        elif self.hparams.modality != "text":
            raise ConfigError(f"modality {self.hparams.modality!r} needs images, but the data has none "
                              "(set data.image_column, or use modality: text)")
        return out


def sample_features(image: Tensor | None, text: Tensor, modality: Modality) -> Tensor:
    """The matrix the detectors score: image, text, or both side by side (inputs L2-normalised)."""
    if modality == "text":
        return text
    if image is None:
        raise ConfigError(f"modality {modality!r} needs image embeddings, and there are none")
    return image if modality == "image" else torch.cat([image, text], dim=1)


# ---------------------------------------------------------------------------
# scoring and report (no Lightning)
# ---------------------------------------------------------------------------


def check_detectors(detectors: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(detectors))  # a repeated name would repeat a CSV column
    unknown = [d for d in names if d not in DETECTORS]
    if unknown or not names:
        raise ConfigError(f"unknown detector(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(DETECTORS)}")
    return names


def read_labels(path: str | Path, num_samples: int) -> np.ndarray:
    """Poison mask from a `PoisonedPairs.save_labels` file; its length must match the data."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such labels file")
    try:
        recorded = None
        if p.suffix != ".npy":
            data = json.loads(p.read_text())
            recorded = data.get("num_samples") if isinstance(data, dict) else None
        mask = load_labels(p, recorded if recorded is not None else num_samples)
    except IndexError:
        raise ConfigError(f"{p}: poisoned indices beyond the data's {num_samples} samples") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{p}: not a poison-labels file ({' '.join(str(exc).split())})") from None
    if len(mask) != num_samples:
        raise ConfigError(f"{p}: labels for {len(mask)} samples, but the data has {num_samples}")
    return mask


def detection_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """ROC-AUC, PR-AUC (average precision) and FPR at 95 % TPR; None when one class is missing."""
    from scipy.stats import rankdata
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

    if labels.all() or not labels.any():
        return {"auroc": None, "pr_auc": None, "fpr_at_95_tpr": None}
    # Average ranks scaled into (0, 1]: torchmetrics squashes scores outside [0, 1] with a sigmoid,
    # which would tie large scores (LID ~ 20+) at 1.0; ranks keep the order and the ties exactly.
    preds = torch.from_numpy(rankdata(scores) / len(scores))
    target = torch.from_numpy(labels.astype(np.int64))
    fpr, tpr, _ = binary_roc(preds, target)
    return {
        "auroc": float(binary_auroc(preds, target)),
        "pr_auc": float(binary_average_precision(preds, target)),
        "fpr_at_95_tpr": float(fpr[tpr >= 0.95].min()),
    }


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 = most anomalous; ties go to the lower index, so the ranking is reproducible."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # readers never see a half-written file


def _write_scores(path: Path, indices: np.ndarray, captions: Sequence[str], scores: dict[str, np.ndarray],
                  ranks: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            head = ["index", "caption"] + (["poisoned"] if labels is not None else [])
            w.writerow(head + [c for d in scores for c in (d, f"{d}_rank")])
            for row in range(len(indices)):
                cells: list[Any] = [int(indices[row]), captions[row]]
                if labels is not None:
                    cells.append(int(labels[row]))
                for d in scores:
                    cells += [f"{scores[d][row]:.6g}", int(ranks[d][row])]
                w.writerow(cells)

    _write_atomic(path, write)


def _figures(out: Path, scores: dict[str, np.ndarray], ranks: dict[str, np.ndarray], labels: np.ndarray | None,
             indices: np.ndarray, captions: Sequence[str], image_loader: Callable[[int], Any] | None, top: int,
             log_image: Callable[[str, np.ndarray], None] | None) -> list[str]:
    # Figures on an Agg canvas, not pyplot: no display needed, and the caller's pyplot backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []

    def figure(width: float, height: float) -> Figure:
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        return fig

    def emit(fig: Figure, name: str) -> None:
        # Fixed layouts, no bbox_inches="tight": each extra layout pass costs a full render.
        fig.savefig(out / f"{name}.png", dpi=100)
        if log_image is not None:  # the saved PNG, not the figure: logging a figure renders it again
            from PIL import Image

            with Image.open(out / f"{name}.png") as im:
                log_image(f"scan_data/{name}", np.asarray(im.convert("RGB")))
        written.append(f"{name}.png")

    for d, s in scores.items():
        fig = figure(5, 3)
        ax = fig.subplots()
        fig.subplots_adjust(left=0.18, right=0.97, bottom=0.17, top=0.9)
        bins = np.histogram_bin_edges(s, bins=50)
        # stepfilled: one patch per histogram instead of one per bar (much faster to draw)
        if labels is not None and labels.any():
            ax.hist(s[~labels], bins=bins, alpha=0.7, histtype="stepfilled", label="clean")
            ax.hist(s[labels], bins=bins, alpha=0.9, histtype="stepfilled", color="crimson", label="poisoned")
            ax.legend()
        else:
            ax.hist(s, bins=bins, histtype="stepfilled")
        ax.set(yscale="log", xlabel=f"{d} score (higher = more anomalous)", ylabel="samples", title=d)
        emit(fig, f"hist_{d}")

    # Thumbnails of the samples the first detector ranks highest: what a person checks by eye.
    first = next(iter(scores))
    rows_top = np.argsort(ranks[first])[:top]
    cols = min(8, max(1, len(rows_top)))
    nrows = max(1, math.ceil(len(rows_top) / cols))
    height = 2.3 * nrows + 0.6  # inches; the top 0.9 hold the figure title and the first row's captions
    fig = figure(1.9 * cols, height)
    axes = fig.subplots(nrows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.9 / height, hspace=0.5)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows_top):
        image = image_loader(int(indices[row])) if image_loader is not None else None
        if image is not None:
            ax.imshow(image)
        mark = " POISON" if labels is not None and labels[row] else ""
        caption = captions[row] if len(captions[row]) <= 60 else captions[row][:57] + "..."
        ax.set_title(f"#{ranks[first][row]} idx {int(indices[row])}{mark}\n{_wrap(caption, 22)}", fontsize=6,
                     color="crimson" if mark else "black")
    fig.suptitle(f"top {len(rows_top)} by {first}", fontsize=9, y=1 - 0.12 / height)
    emit(fig, "top_samples")
    return written


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


def score_and_report(
    embeddings: Tensor,
    captions: Sequence[str],
    labels: str | Path | np.ndarray | None,
    detectors: Sequence[str],
    k: int,
    out_dir: str | Path,
    *,
    image_text: tuple[Tensor, Tensor] | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    image_loader: Callable[[int], Any] | None = None,
    top: int = 16,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    log_image: Callable[[str, np.ndarray], None] | None = None,
    seed: int = 0,
    quiet: bool = False,
    reference_size: int | None = None,
    reference_draws: int = 8,
) -> dict[str, Any]:
    """Score every row of ``embeddings`` against all the others and write the report files.

    Args:
        embeddings: ``[N, D]`` sample features (see `sample_features`).
        captions: the ``N`` captions, in row order.
        labels: poison labels: a `PoisonedPairs.save_labels` file or a bool mask; None if unknown.
        detectors: names from `lit_amdet.outliers.DETECTORS`.
        k: neighbourhood size of the kNN detectors and LOF.
        out_dir: where ``scores.csv``, ``report.json`` and the PNG figures go.
        image_text: ``(image, text)`` embeddings for the ``clip`` baseline (negated pair cosine).
        indices: data-set index of each row (default ``0..N-1``).
        image_loader: data-set index -> PIL image, for the thumbnails (None: captions only).
        top: how many top-ranked samples the thumbnail figure and the report list.
        chunk_size: query rows per kNN block (memory vs speed).
        device: where the kNN search runs (default: where ``embeddings`` are).
        log_image: called as ``log_image(tag, rgb_uint8_hwc)`` with each PNG written (e.g. for TensorBoard).
        seed: seed of the isolation forest and of the reference subsamples.
        quiet: do not print the summary table.
        reference_size: score against ``reference_draws`` random subsamples of this many samples (averaged)
            instead of the whole set: unmasks poisons that outnumber ``k`` (see `score_samples`).
        reference_draws: number of subsamples.

    Returns:
        The ``report.json`` content.
    """
    names = check_detectors(detectors)
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ConfigError(f"need an [N, D] embedding matrix with N >= 2, got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if len(captions) != n:
        raise ConfigError(f"{len(captions)} captions for {n} embeddings")
    if not 1 <= k < n:
        raise ConfigError(f"k={k} must be in [1, {n - 1}] for {n} samples")
    if top < 0 or chunk_size < 1:
        raise ConfigError(f"top must be >= 0 and chunk_size >= 1 (got {top}, {chunk_size})")
    if "clip" in names and image_text is None:
        raise ConfigError("the clip detector needs image and text embeddings (a model with an image tower "
                          "and data with images); drop it from detectors")
    if not bool(torch.isfinite(embeddings).all()):
        raise LitAmdetError("the embeddings contain NaN or inf values; the model is broken for this data")
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    mask = read_labels(labels, n) if isinstance(labels, (str, Path)) else labels
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n,):
            raise ConfigError(f"labels for {mask.size} samples, but there are {n}")

    x = embeddings.to(device) if device is not None else embeddings
    others = [d for d in names if d != "clip"]
    try:  # the library's own checks (e.g. reference_size) become the one-line config error
        raw = score_samples(x, others, k, chunk_size=chunk_size, seed=seed, reference_size=reference_size,
                            reference_draws=reference_draws) if others else {}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if "clip" in names:
        assert image_text is not None
        raw["clip"] = clip_score(*image_text)
    scores = {d: raw[d].detach().double().cpu().numpy() for d in names}
    ranks = {d: _ranks(s) for d, s in scores.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_scores(out / "scores.csv", idx, captions, scores, ranks, mask)
    figures = _figures(out, scores, ranks, mask, idx, captions, image_loader, top, log_image)
    report: dict[str, Any] = {
        "num_samples": n,
        "dim": int(embeddings.shape[1]),
        "k": k,
        "reference_size": reference_size,
        "reference_draws": reference_draws if reference_size is not None else None,
        "detectors": names,
        "num_poisoned": int(mask.sum()) if mask is not None else None,
        "metrics": {d: detection_metrics(scores[d], mask) for d in names} if mask is not None else None,
        "top": {d: idx[np.argsort(ranks[d])[:top]].tolist() for d in names},
        "files": ["scores.csv", *figures],
    }
    _write_atomic(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    if not quiet:
        _print_summary(report, out)
    return report


def _print_summary(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = report["metrics"]
    table = Table(title=f"scan_data: {report['num_samples']} samples, k={report['k']}"
                  + (f", {report['num_poisoned']} labelled poisoned" if metrics else ""))
    table.add_column("detector")
    if metrics:
        for col in ("ROC-AUC", "PR-AUC", "FPR@95%TPR"):
            table.add_column(col, justify="right")
    table.add_column("top indices")
    for d in report["detectors"]:
        cells = [d]
        if metrics:
            cells += ["-" if v is None else f"{v:.3f}" for v in metrics[d].values()]
        table.add_row(*cells, " ".join(map(str, report["top"][d][:5])))
    console = Console()
    console.print(table)
    console.print(f"written to {out}")


# ---------------------------------------------------------------------------
# the Lightning side: `lit-amdet scan_data`
# ---------------------------------------------------------------------------


def _merge(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"index": torch.cat([b["index"] for b in batches]),
                              "caption": [c for b in batches for c in b["caption"]],
                              "text": torch.cat([b["text"] for b in batches])}
    has_image = [("image" in b) for b in batches]
    merged["image"] = torch.cat([b["image"] for b in batches]) if all(has_image) else None
    return merged


def _gather(local: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """All ranks' predicted batches in data-set order (distributed samplers may pad with repeats)."""
    import torch.distributed as dist

    parts: list[Any] = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, list(local))
    merged = _merge([batch for part in parts for batch in part])
    index = merged["index"]
    uniq, first = np.unique(index.numpy(), return_index=True)
    if not np.array_equal(uniq, np.arange(len(uniq))):
        raise LitAmdetError(f"predictions cover {len(uniq)} distinct indices, not 0..N-1; "
                            "the predict dataloader must serve the whole set")
    keep = torch.from_numpy(first)
    return {"index": index[keep], "caption": [merged["caption"][i] for i in first],
            "text": merged["text"][keep], "image": merged["image"][keep] if merged["image"] is not None else None}


def _image_loader(datamodule: Any) -> Callable[[int], Any] | None:
    dataset = getattr(datamodule, "dataset", None)
    if dataset is None or not getattr(datamodule, "has_images", False):
        return None

    def load(i: int) -> Any:
        item = dataset[i]
        return item.get("image") if isinstance(item, dict) else None

    return load


def _image_logger(trainer: Any) -> Callable[[str, np.ndarray], None] | None:
    """TensorBoard-style loggers (anything whose experiment has ``add_image``), else None."""
    writers = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
    if not writers:
        return None

    def log(tag: str, image: np.ndarray) -> None:
        for w in writers:
            w.add_image(tag, image, dataformats="HWC")

    return log


def save_embeddings(path: Path, data: dict[str, Any], modality: str, encoder: str) -> None:
    from safetensors.torch import save_file

    tensors = {"index": data["index"].contiguous(), "text": data["text"].contiguous()}
    if data["image"] is not None:
        tensors["image"] = data["image"].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"modality": modality,
                                                                        "encoder": encoder}))


def run_scan(trainer: Any, model: Any, datamodule: Any, detectors: Sequence[str], k: int, labels: str | None,
             output_dir: str, top: int, chunk_size: int, reference_size: int | None = None,
             reference_draws: int = 8) -> dict[str, Any]:
    """``lit-amdet scan_data``: embed with ``trainer.predict``, then `score_and_report` on rank 0."""
    if not isinstance(model, SampleEmbedding):
        raise ConfigError(f"scan_data needs --model lit_amdet.modules.data_scan.SampleEmbedding "
                          f"(got {type(model).__name__})")
    if datamodule is None:
        raise ConfigError("scan_data needs data: --data lit_amdet.datamodules.TextEncoderDataModule --data.source ...")
    names = check_detectors(detectors)
    modality = model.hparams.modality
    has_images = getattr(datamodule, "has_images", None)
    # Cheap checks before an embedding pass that may take many GPU-minutes.
    if has_images is False and (modality != "text" or "clip" in names):
        raise ConfigError(f"{'the clip detector' if modality == 'text' else f'modality {modality!r}'} needs "
                          "images, but the data has none (set data.image_column)")
    if "clip" in names and not model.encoder.has_image_tower:
        raise ConfigError(f"the clip detector needs an image tower; {model.encoder.name} has none; "
                          "drop it from detectors")
    if labels is not None and getattr(datamodule, "dataset", None) is not None:
        read_labels(labels, len(datamodule.dataset))
    if reference_size is not None and getattr(datamodule, "dataset", None) is not None:
        try:  # before anything is written to the run folder
            check_reference_size(k, reference_size, reference_draws, len(datamodule.dataset))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    predictions = trainer.predict(model, datamodule)
    if not predictions:
        raise LitAmdetError("predict returned nothing (spawn-based strategies return no predictions; "
                            "use strategy: ddp)")
    data = _gather(predictions)
    if not trainer.is_global_zero:
        return {}
    out = Path(output_dir)
    save_embeddings(out / EMBEDDINGS, data, modality, model.hparams.encoder)
    features = sample_features(data["image"], data["text"], modality)
    image_text = (data["image"], data["text"]) if data["image"] is not None else None
    return score_and_report(features, data["caption"], labels, names, k, out, image_text=image_text,
                            indices=data["index"].numpy(), image_loader=_image_loader(datamodule), top=top,
                            chunk_size=chunk_size, device=trainer.strategy.root_device,
                            log_image=_image_logger(trainer), reference_size=reference_size,
                            reference_draws=reference_draws)
