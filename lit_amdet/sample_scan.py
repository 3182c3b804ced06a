"""Score every pair of an image-caption data set for backdoor poisoning and write the report (SPEC §4).

Poisoned pairs have sparse local neighbourhoods in the embedding space of the
CLIP trained on them (Huang et al., ICLR 2025). `score_and_report` scores the
whole set with the exact, global kNN detectors of `lit_amdet.outliers` and
writes ``scores.csv``, figures and ``report.json`` (ROC-AUC, PR-AUC and
FPR@95%TPR when poison labels are known). Plain torch/numpy, no Lightning:
cached embeddings can be re-scored. ``lit-amdet scan_data``
(`lit_amdet.commands.scan_data`) embeds the pairs with
`lit_amdet.modules.data_scan.SampleEmbedding` through ``Trainer.predict``,
then calls `gather_predictions`, `save_embeddings`, `sample_features` and
`score_and_report` from here.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lit_amdet import cleaning
from lit_amdet.datamodules.shards import skipped_summary
from lit_amdet.errors import ConfigError, LitAmdetError, missing_hint
from lit_amdet.io import write_json, write_with
from lit_amdet.metrics import combine, combined_names, ranking_metrics
from lit_amdet.metrics import ranks as rank_scores
from lit_amdet.neighbours import NeighbourSearch
from lit_amdet.outliers import (
    DETECTORS,
    PAIR_DETECTORS,
    SAME_CAPTION,
    DaoForm,
    Variant,
    score_samples,
)
from lit_amdet.poisoning import load_labels

Modality = Literal["image", "text", "both"]
MODALITIES = ("image", "text", "both")
EMBEDDINGS = "embeddings.safetensors"


def sample_features(image: Tensor | None, text: Tensor, modality: Modality) -> Tensor:
    """The matrix the detectors score: image, text, or both side by side (inputs L2-normalised)."""
    if modality == "text":
        return text
    if image is None:
        raise ConfigError(f"modality {modality!r} needs image embeddings, and there are none")
    return image if modality == "image" else torch.cat([image, text], dim=1)


def check_detectors(detectors: Sequence[str]) -> list[str]:
    """The detector names without repeats; an unknown name (or none) is a `ConfigError`. A name joining several
    detectors with ``+``, ``*`` and parentheses (``dao+xgroup``, ``(dao+xgroup)+dao*xgroup``) is their
    `lit_amdet.metrics.combine`."""
    names = list(dict.fromkeys(detectors))  # a repeated name would repeat a CSV column
    unknown = [d for d in names if not _readable(d)]
    if unknown or not names:
        raise ConfigError(f"unknown detector(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(DETECTORS)}, or several joined by + (their rank union), "
                          "* (their rank product) and parentheses: (dao+xgroup)+dao*xgroup")
    return names


def _readable(name: str) -> bool:
    try:
        return all(part in DETECTORS for part in combined_names(name))
    except ValueError:
        return False


def detectors_run(detectors: Sequence[str], budget: float | int | None, cut_by: str) -> list[str]:
    """`check_detectors` of ``detectors`` plus, with a ``budget``, the cut's ``cut_by``: the cut's ranking is
    always scored (the default, a combination, need not be listed)."""
    return check_detectors([*detectors, cut_by] if budget is not None else detectors)


def base_detectors(names: Sequence[str]) -> list[str]:
    """The detectors ``names`` need computed: each one, the parts of each combination (`check_detectors`)."""
    return list(dict.fromkeys(part for d in names for part in combined_names(d)))


def read_labels(path: str | Path, num_samples: int) -> np.ndarray:
    """Poison mask from a `PoisonedPairs.save_labels` file; its length must match the data."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such labels file{missing_hint(p)}")
    try:
        recorded = None
        if p.suffix != ".npy":
            data = json.loads(p.read_text())
            recorded = data.get("num_samples") if isinstance(data, dict) else None
        if recorded is not None and recorded != num_samples:  # a file made for other data (1e14 was a MemoryError)
            raise ConfigError(f"{p}: labels for {recorded} samples, but the data has {num_samples}")
        mask = load_labels(p, num_samples)
    except IndexError:
        raise ConfigError(f"{p}: poisoned indices outside the data's {num_samples} samples (0..{num_samples - 1})"
                          ) from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConfigError(f"{p}: not a poison-labels file ({' '.join(str(exc).split())})") from None
    return mask  # of num_samples entries: load_labels makes it that long


# ---------------------------------------------------------------------------
# scores.csv, figures, report.json
# ---------------------------------------------------------------------------


def write_scores(path: Path, indices: np.ndarray, captions: Sequence[str], scores: dict[str, np.ndarray],
                 ranks: dict[str, np.ndarray], labels: np.ndarray | None) -> Path:
    """``scores.csv``: index, caption, [poisoned,] then each detector's score and rank (1 = most anomalous)."""
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

    return write_with(path, write)  # readers never see a half-written file


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
        path = write_with(out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        if log_image is not None:  # the saved PNG, not the figure: logging a figure renders it again
            from PIL import Image

            with Image.open(path) as im:
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
        emit(fig, "hist_" + re.sub(r"[^A-Za-z0-9_+-]", "", d.replace("*", "_times_")))  # a portable file name

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


def check_ranges(k: int, top: int, chunk_size: int, n: int | None) -> None:
    """``k``, ``top`` and ``chunk_size`` for ``n`` samples (None: not known yet, so ``k`` only >= 1): one
    `ConfigError`. Checked by `lit_amdet.commands.scan_data` before the embedding pass and anything written, and
    again here."""
    if k < 1 or (n is not None and k >= n):
        raise ConfigError(f"k={k} must be in [1, {n - 1}] for {n} samples" if n is not None else
                          f"k={k} must be at least 1")
    if top < 0 or chunk_size < 1:
        raise ConfigError(f"top must be >= 0 and chunk_size >= 1 (got {top}, {chunk_size})")


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
    variant: Variant = "exact",
    dao_form: DaoForm = "log",
    search: NeighbourSearch | None = None,
    budget: float | int | None = None,
    cut_by: str = "dao",
    keys: Sequence[str] | None = None,
    write_shards: Callable[[np.ndarray], dict] | None = None,
    skipped: Sequence[dict[str, Any]] | None = None,
    same_caption: float = SAME_CAPTION,
) -> dict[str, Any]:
    """Score every row of ``embeddings`` against all the others and write the report files.

    Args:
        embeddings: ``[N, D]`` sample features (see `sample_features`).
        captions: the ``N`` captions, in row order.
        labels: poison labels: a `PoisonedPairs.save_labels` file or a bool mask; None if unknown.
        detectors: names from `lit_amdet.outliers.DETECTORS`, or several joined by ``+`` and ``*`` (with
            parentheses; `lit_amdet.metrics.combine`: rank union and rank product; its parts are scored and
            reported too).
        k: neighbourhood size of the kNN detectors and LOF.
        out_dir: where ``scores.csv``, ``report.json`` and the PNG figures go.
        image_text: ``(image, text)`` embeddings for the ``clip`` baseline (negated pair cosine) and ``xmodal``
            (a caption against its image's neighbours' captions).
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
        variant: ``exact``, or ``reference``: the kNN detectors as the published code computes them (shifted
            neighbour indices, the (k+1)-th distance; `lit_amdet.outliers.reference_code_scores`).
        dao_form: DAO's ``log`` form (SPEC §4, the reference code) or the DAO paper's ``power`` form (its log).
        search: the neighbour search spread over processes (`lit_amdet.neighbours.ShardedSearch`): every
            process calls this with the same arguments; all take part in the search, process 0 writes the
            files and the others return ``{}``.
        budget: remove ``cut_by``'s top ``budget`` (a fraction in (0, 1) or a count; `lit_amdet.cleaning`; ``cut_by``
            is scored whether ``detectors`` lists it or not):
            writes ``keep.txt``/``flagged.txt`` and the report's ``cut`` block; None: no cut.
        cut_by: the detector whose ranking picks the cut.
        keys: each row's sample key for the key lists (default: its data-set index).
        write_shards: called with the kept samples' data-set indices to write filtered shards; its counts go
            in the ``cut`` block.
        skipped: the bad samples the data module left out (`TextEncoderDataModule.skipped`): counted in the
            report's ``skipped`` block (None: not reported).
        same_caption: xgroup's caption cosine for "says the same thing" (`lit_amdet.outliers.caption_group_mean`).

    Returns:
        The ``report.json`` content.
    """
    names = detectors_run(detectors, budget, cut_by)
    computed = base_detectors(names)
    names = list(dict.fromkeys([*names, *computed]))  # a union's parts are reported beside it
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ConfigError(f"need an [N, D] embedding matrix with N >= 2, got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if len(captions) != n:
        raise ConfigError(f"{len(captions)} captions for {n} embeddings")
    check_ranges(k, top, chunk_size, n)
    pair = [d for d in computed if d in PAIR_DETECTORS]
    if pair and image_text is None:
        raise ConfigError(f"the {pair[0]} detector needs image and text embeddings (a model with an image tower "
                          "and data with images); drop it from detectors")
    cleaning.check_cut(budget, cut_by, names, n)
    if keys is not None and len(keys) != n:
        raise ConfigError(f"{len(keys)} sample keys for {n} embeddings")
    if not bool(torch.isfinite(embeddings).all()):
        raise LitAmdetError("the embeddings contain NaN or inf values; the model is broken for this data")
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    mask = read_labels(labels, n) if isinstance(labels, (str, Path)) else labels
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n,):
            raise ConfigError(f"labels for {mask.size} samples, but there are {n}")

    x = embeddings.to(device) if device is not None else embeddings
    image, text = (None, None) if image_text is None else (t.to(x.device) for t in image_text)
    try:  # the library's own checks (e.g. reference_size) become the one-line config error
        raw = score_samples(x, computed, k, chunk_size=chunk_size, seed=seed, reference_size=reference_size,
                            reference_draws=reference_draws, variant=variant, dao_form=dao_form, search=search,
                            text_embeddings=text, image_embeddings=image, same_caption=same_caption)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if search is not None and not search.is_root:
        return {}  # this process lent its share of the neighbour search; process 0 writes the report
    scores = {d: raw[d].detach().double().cpu().numpy() for d in computed}
    scores = {d: scores[d] if d in scores else combine(d, scores) for d in names}
    ranks = {d: rank_scores(s) for d, s in scores.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unseal(out)
    write_scores(out / "scores.csv", idx, captions, scores, ranks, mask)
    figures = _figures(out, scores, ranks, mask, idx, captions, image_loader, top, log_image)
    report: dict[str, Any] = {
        "num_samples": n,
        "dim": int(embeddings.shape[1]),
        "k": k,
        "reference_size": reference_size,
        "reference_draws": reference_draws if reference_size is not None else None,
        "variant": variant,
        "dao_form": dao_form,
        "same_caption": same_caption if "xgroup" in computed else None,
        "detectors": names,
        "num_poisoned": int(mask.sum()) if mask is not None else None,
        "metrics": {d: ranking_metrics(scores[d], mask) for d in names} if mask is not None else None,
        "top": {d: idx[np.argsort(ranks[d])[:top]].tolist() for d in names},
        "files": ["scores.csv", *figures],
        # what each detector's own top 1 % would remove: the removed/lost columns of the benchmark table
        "removal_at_1pct": cleaning.metrics_at_budget(scores, mask) if mask is not None else None,
    }
    if budget is not None:
        keys = [str(i) for i in idx] if keys is None else keys
        report["cut"] = cleaning.apply_cut(scores, cut_by, budget, mask, keys, out, idx, write_shards)
        report["files"] += report["cut"]["files"]
    if skipped is not None:
        report["skipped"] = skipped_summary(skipped)
    write_json(out / "report.json", report)
    if not quiet:
        print_summary(report, out)
    return report


def print_summary(report: dict[str, Any], out: Path) -> None:
    """The report as a table on the console: per detector its metrics (when labelled) and top indices."""
    from rich.console import Console
    from rich.table import Table

    metrics = report["metrics"]
    table = Table(title=f"scan_data: {report['num_samples']} samples, k={report['k']}"
                  + (f", {report['num_poisoned']} labelled poisoned" if metrics else ""))
    table.add_column("detector")
    if metrics:
        for col in ("ROC-AUC", "PR-AUC", "FPR@95%TPR", "removed@1%", "lost@1%"):
            table.add_column(col, justify="right")
    table.add_column("top indices")
    for d in report["detectors"]:
        cells = [d]
        if metrics:
            cells += ["-" if v is None else f"{v:.3f}" for v in metrics[d].values()]
            at = report["removal_at_1pct"][d]
            cells += [f"{at['poisons_removed']}/{at['poisons']}", str(at["clean_lost"])]
        table.add_row(*cells, " ".join(map(str, report["top"][d][:5])))
    console = Console()
    console.print(table)
    if "cut" in report:
        console.print(cleaning.cut_line(report["cut"], out))
    console.print(f"written to {out}")


# ---------------------------------------------------------------------------
# predictions of `SampleEmbedding` -> embeddings, images, logged figures
# ---------------------------------------------------------------------------


def _merge(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"index": torch.cat([b["index"] for b in batches]),
                              "caption": [c for b in batches for c in b["caption"]],
                              "text": torch.cat([b["text"] for b in batches])}
    has_image = [("image" in b) for b in batches]
    merged["image"] = torch.cat([b["image"] for b in batches]) if all(has_image) else None
    return merged


def gather_predictions(local: Sequence[dict[str, Any]]) -> dict[str, Any]:
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


def dataset_image_loader(datamodule: Any) -> Callable[[int], Any] | None:
    """Data-set index -> PIL image from ``datamodule.dataset`` (None when the data has no images)."""
    dataset = getattr(datamodule, "dataset", None)
    if dataset is None or not getattr(datamodule, "has_images", False):
        return None

    def load(i: int) -> Any:
        item = dataset[i]
        return item.get("image") if isinstance(item, dict) else None

    return load


def image_logger(loggers: Sequence[Any]) -> Callable[[str, np.ndarray], None] | None:
    """``log_image`` for TensorBoard-style loggers (anything whose experiment has ``add_image``), else None."""
    writers = [lg.experiment for lg in loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
    if not writers:
        return None

    def log(tag: str, image: np.ndarray) -> None:
        for w in writers:
            w.add_image(tag, image, dataformats="HWC")

    return log


def unseal(out_dir: Path) -> None:
    """Remove ``report.json``, the run's seal, before any other file of the run is rewritten; it is written
    (atomically) last, so a report.json on disk always describes the embeddings, scores, key lists and shards
    beside it, never an older run's."""
    (Path(out_dir) / "report.json").unlink(missing_ok=True)


def save_embeddings(path: Path, data: dict[str, Any], modality: str, encoder: str) -> Path:
    """The gathered embeddings (index, text, image if any) as safetensors, with modality and encoder."""
    from safetensors.torch import save_file

    tensors = {"index": data["index"].contiguous(), "text": data["text"].contiguous()}
    if data["image"] is not None:
        tensors["image"] = data["image"].contiguous()
    return write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"modality": modality,
                                                                               "encoder": encoder}))
