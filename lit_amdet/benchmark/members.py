"""The zoo as a folder: one sub-folder per model, its ground truth in ``backdoor.json``.

Anyone can put their own models there beside the ones `build_zoo` trains; folders whose name starts with a
dot (a build in progress) are never members.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from lit_amdet.benchmark.options import SPLITS
from lit_amdet.benchmark.plan import ZooBase
from lit_amdet.errors import ConfigError
from lit_amdet.record import BackdoorRecord


@dataclass(frozen=True)
class ZooEntry:
    """One member found in a zoo folder: where it is and what its backdoor.json says (normalised)."""

    name: str
    path: Path
    base: str
    split: str
    backdoored: bool
    attack: str | None
    trigger_kind: str | None
    trigger: str | None
    target_caption: str | None
    adaptive: str | None = None
    drift_target: float | None = None  # the drift sweep's level (None: not a sweep member)
    drift_mode: str | None = None

    def facts(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def is_member(folder: Path) -> bool:
    """A complete zoo member: a visible folder holding backdoor.json (builds appear in one rename)."""
    folder = Path(folder)
    return folder.is_dir() and not folder.name.startswith(".") and BackdoorRecord.exists(folder)


def read_zoo(zoo_dir: str | Path) -> list[Path]:
    """Every complete member folder of a zoo, by name (hidden build folders are not members)."""
    zoo_dir = Path(zoo_dir)
    if not zoo_dir.is_dir():
        return []
    return sorted(p for p in zoo_dir.iterdir() if is_member(p))


def zoo_entry(path: Path, bases: Sequence[ZooBase]) -> ZooEntry | None:
    """Normalise a member's backdoor.json; None when it belongs to none of ``bases``.

    Members `build_member` wrote carry a ``zoo`` section; other models are matched to a base by the
    ``base`` path their backdoor.json names (as `lit-amdet fit` writes it) and go to the test split
    unless ``zoo.split`` says otherwise.
    """
    path = Path(path)
    record = BackdoorRecord.read(path)
    zoo = record.zoo or {}
    base = zoo.get("base") or next((b.name for b in bases if _same_path(b.path, record.base)), None)
    if base not in {b.name for b in bases}:
        return None
    split = zoo.get("split", "test")
    if split not in SPLITS:
        raise ConfigError(f"{BackdoorRecord.path(path)}: zoo.split must be one of {', '.join(SPLITS)}, "
                          f"got {split!r}")
    attack = kind = trigger = target = None
    if record.backdoored:
        first = record.first_backdoor
        attacks = record.attacks or [first.get("kind")]
        attack = zoo.get("attack") or "+".join(a for a in attacks if a) or None
        mode = record.trigger.get("mode")
        kind = zoo.get("trigger_kind") or {"replace_char": "char", "insert_word": "word"}.get(mode)
        trigger = zoo.get("trigger") or record.trigger.get("text")
        target = zoo.get("target_caption") or record.target
    return ZooEntry(path.name, path, base, split, record.backdoored, attack, kind, trigger, target,
                    zoo.get("adaptive"), zoo.get("drift_target"), zoo.get("drift_mode"))


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return a == b or os.path.realpath(a) == os.path.realpath(b)
