"""Screening many models in one ``lit-amdet detect``: several suspects, a folder of checkpoints, and containers
with more than one text encoder (SDXL), each encoder scanned against its own anchor.

A *target* is one text encoder to scan. ``scan_targets`` expands what the user gave into targets; `screen` runs
them one after the other in this process (or deals them round-robin across the processes of a multi-device
trainer), with the anchor loaded once and the prompts built once, and process 0 writes ``summary.csv`` and
``summary.md`` beside the run folders. A target whose run folder already holds its report is not scanned again.
"""

from __future__ import annotations

import csv
import io
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from lit_amdet.decision import BACKDOORED, INCONCLUSIVE, verdict_word
from lit_amdet.errors import ConfigError, LitAmdetError
from lit_amdet.io import read_json, write_text

#: a verdict that is not a scan's: the target could not be loaded or scanned (its one-line reason is kept)
ERROR = "error"
COLUMNS = ("model", "encoder", "verdict", "probability", "decided_by", "recovered_caption", "seconds", "report")
#: files a folder of checkpoints may hold as suspects (pickles are still refused unless allow_pickle)
CHECKPOINT_FILES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Target:
    """One text encoder to scan: the checkpoint reference, which encoder of it, and its names."""

    ref: str
    component: str | None
    model: str  # the checkpoint's name (a pipeline, file or hub id)
    label: str  # the run folder's and the verdict line's name: the model, or model.component
    error: str | None = None


def is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return path.suffix in CHECKPOINT_FILES
    return any((path / f).is_file() for f in ("config.json", "open_clip_config.json", "model_index.json"))


def _references(suspect: str | Sequence[str]) -> list[str]:
    """A list as given; a folder that is not itself a checkpoint: the checkpoints in it (sub-folders and files)."""
    if not isinstance(suspect, str):
        return [str(s) for s in suspect]
    path = Path(suspect)
    if path.is_dir() and not is_checkpoint(path):
        found = sorted(str(p) for p in path.iterdir() if not p.name.startswith(".") and is_checkpoint(p))
        if not found:
            raise ConfigError(f"{path}: neither a checkpoint nor a folder of checkpoints")
        return found
    return [suspect]


def scan_targets(suspect: str | Sequence[str], component: str | None = None,
                 allow_pickle: bool = False) -> list[Target]:
    """Every text encoder to scan. A reference that cannot be opened becomes a target with its error when there
    are several suspects (the others are still scanned); alone, its error is raised."""
    from lit_amdet.encoders import text_encoder_components
    from lit_amdet.encoders.loading import resolve

    refs = _references(suspect)
    targets = []
    for ref in refs:
        try:
            name = resolve(ref).name
            held = text_encoder_components(ref, allow_pickle)
        except Exception as exc:  # noqa: BLE001 - one suspect's failure, whatever its type, is its row's
            if len(refs) == 1:
                raise
            targets.append(Target(ref, component, Path(ref).name, Path(ref).name, error=failure(exc)))
            continue
        for part in [component] if component else held or [None]:
            label = f"{name}.{part}" if len(held) > 1 else name
            targets.append(Target(ref, part, name, label))
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        twice = next(x for x in labels if labels.count(x) > 1)
        raise ConfigError(f"two suspects are both named {twice!r}; their run folders would collide")
    return targets


def worst(verdicts: Sequence[str]) -> str:
    """A model's verdict from its encoders' (and a screening's from its models'): flagged beats error beats
    inconclusive beats clean."""
    for v in (BACKDOORED, ERROR, INCONCLUSIVE):
        if v in verdicts:
            return v
    return "clean"


def row_of(target: Target, report: dict | None, run_dir: Path, seconds: float | None, error: str | None) -> dict:
    if report is None:
        return {"model": target.model, "encoder": target.component or "", "verdict": ERROR, "probability": "",
                "decided_by": error or "", "recovered_caption": "", "seconds": "", "report": ""}
    caption = report["nearest_captions"][0]["caption"] if report.get("nearest_captions") else ""
    probability = next((c["value"] for c in report.get("checks", []) if c["name"] == "calibrated_probability"), None)
    return {"model": target.model, "encoder": target.component or "", "verdict": report["verdict"],
            "probability": "" if probability is None else f"{probability:.3f}", "decided_by": report["decided_by"],
            "recovered_caption": caption, "seconds": f"{seconds if seconds is not None else report['seconds']:.1f}",
            "report": str(run_dir / "report.json")}


def model_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per model with several encoders (SDXL): the worst of its encoders' verdicts."""
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    out = []
    for model, group in by_model.items():
        if len(group) > 1:
            verdict = worst([r["verdict"] for r in group])
            flagged = [r["encoder"] for r in group if r["verdict"] == verdict]
            out.append({**{c: "" for c in COLUMNS}, "model": model, "encoder": "(model)", "verdict": verdict,
                        "decided_by": f"{verdict} in {', '.join(flagged)}",
                        "seconds": f"{sum(float(r['seconds'] or 0) for r in group):.1f}"})
    return out


def write_summary(folder: Path, rows: Sequence[dict]) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.md`` (one row per encoder scanned, then one per multi-encoder model)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [str(r[c]).replace("|", "\\|").replace("\n", " ") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    return write_text(folder / "summary.csv", buf.getvalue()), write_text(folder / "summary.md", md)


def finished_report(run_dir: Path, target: Target) -> dict | None:
    """The report of an earlier scan of this same target, if its run folder is complete; None for a report that is
    unreadable or lacks what a summary row reads (damaged since: the target is scanned again, and the new run
    folder replaces the old one whole)."""
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    try:
        report = read_json(path, "scan report")
        same = report["suspect"]["path"] == target.ref and \
            report.get("hyperparameters", {}).get("component") == target.component
        row_of(target, report, run_dir, None, None)
    except (ConfigError, KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    return report if same else None


def failure(exc: Exception) -> str:
    """One suspect's error as its row says it: ours as it is, any other with its type named ("unexpected ...")."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, LitAmdetError) else f"unexpected {type(exc).__name__}: {text}"


def screen_share(targets: Sequence[Target], root: Path, scan_one: Callable[[Target, Path], dict],
                 rank: int = 0, world_size: int = 1) -> list[dict]:
    """Scan this process's round-robin share of ``targets``; a row per target (skipping finished ones)."""
    rows = []
    for target in list(targets)[rank::world_size]:
        run_dir = root / target.label
        report, seconds, error = finished_report(run_dir, target), None, target.error
        if report is None and error is None:
            started = time.perf_counter()
            try:
                scan_one(target, run_dir)
                report, seconds = read_json(run_dir / "report.json", "scan report"), time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - a suspect that fails in a way no check foresaw is an error
                error = failure(exc)  # row too; the others are still scanned and the summary is written
        row = row_of(target, report, run_dir, seconds, error)
        rows.append(row)
        said = verdict_word(row["verdict"], row.get("decided_by"))
        print(f"{target.label}: {said}" + (f" ({error})" if row["verdict"] == ERROR else ""), flush=True)
    return rows


def target_trainer(trainer, label: str, device: tuple[str, int | list[int]]):
    """A fresh single-process Trainer made with ``trainer``'s own arguments (a Trainer runs one fit): its
    callbacks shared (a deep copy fails on those that hold a parser or a lock, such as the CLI's
    SaveConfigCallback), its TensorBoard logger given a version per target, on ``device`` (`choose_device`)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    kwargs = getattr(trainer, "init_kwargs", None)
    if kwargs is None:
        raise ConfigError("several suspects need the trainer lit-amdet detect makes (lit_amdet.cli.AmdetTrainer)")
    kwargs = dict(kwargs)
    kwargs["callbacks"] = list(kwargs.get("callbacks") or [])
    logger = trainer.logger
    kwargs["logger"] = (TensorBoardLogger(save_dir=logger.save_dir, name=logger.name, version=label)
                        if isinstance(logger, TensorBoardLogger) else False)
    accelerator, devices = device
    kwargs.update(accelerator=accelerator, devices=devices, strategy="auto", num_nodes=1)
    return type(trainer)(**kwargs)


_ANCHORS: dict | None = None


@contextmanager
def anchors_loaded_once() -> Iterator[None]:
    """Within this block every scan shares each anchor encoder it loads (frozen, never trained, so shareable)."""
    global _ANCHORS
    saved, _ANCHORS = _ANCHORS, {}
    try:
        yield
    finally:
        _ANCHORS = saved


def load_anchor(ref: str, component: str | None, model_name: str | None, allow_pickle: bool):
    """The anchor encoder, loaded once per `anchors_loaded_once` block (every time outside one); of a whole CLIP or
    SigLIP model only the text tower, as the suspect (`lit_amdet.encoders.load_encoder`'s ``text_only``)."""
    from lit_amdet.encoders import load_encoder

    key = (ref, component, model_name, allow_pickle)
    if _ANCHORS is not None and key in _ANCHORS:
        return _ANCHORS[key]
    anchor = load_encoder(ref, model_name=model_name, allow_pickle=allow_pickle, component=component, text_only=True)
    if _ANCHORS is not None:
        _ANCHORS[key] = anchor
    return anchor


def anchor_component(anchor: str, suspect_component: str | None, allow_pickle: bool = False) -> str | None:
    """Which encoder of the anchor a suspect's encoder is compared with: the same one (SDXL's text_encoder_2
    against the base's text_encoder_2), the only one, or none for a plain anchor."""
    from lit_amdet.encoders import text_encoder_components

    parts = text_encoder_components(anchor, allow_pickle)
    if not parts:
        return None
    if suspect_component in parts:
        return suspect_component
    if len(parts) == 1:
        return parts[0]
    raise ConfigError(f"the anchor {anchor} holds {', '.join(parts)}; the suspect's encoder "
                      f"({suspect_component or 'a plain checkpoint'}) matches none: give the anchor's encoder")


__all__ = ["ERROR", "Target", "anchor_component", "anchors_loaded_once", "failure", "load_anchor", "model_rows",
           "scan_targets", "screen_share", "target_trainer", "worst", "write_summary"]
