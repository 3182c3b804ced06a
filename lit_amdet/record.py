"""``backdoor.json``: the ground truth a model folder carries, as one typed record.

`BackdoorInjection` and `ContrastiveTraining` write it next to the model they
save; model zoos, the benchmark, the demo and the figure scripts read it. Keys
this version does not know are kept in ``extra`` and written back unchanged,
so a record someone else wrote survives a read/write round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lit_amdet.errors import ConfigError
from lit_amdet.io import read_json, write_json

FILENAME = "backdoor.json"
#: the training record a `ContrastiveTraining` run writes beside its model, last (`lit_amdet.bases.base_ready`
#: reads a base as built by it)
TRAINING_INFO = "training.json"


@dataclass
class BackdoorRecord:
    """What a model folder says it is.

    ``backdoored``: the truth. ``kind``: ``backdoor_injection`` or ``benign_finetune`` (or anything a user
    writes). ``backdoors``: per planted backdoor its trigger (``Trigger`` fields), target caption, target
    images and weight (`lit_amdet.triggers.Backdoor.describe`); ``attacks`` their kinds. ``metrics``: the
    training run's last logged values (held-out attack success under ``val/b0/*``). ``zoo``: the benchmark's
    plan of the member (`lit_amdet.benchmark`), absent for models trained by hand.
    """

    backdoored: bool
    kind: str | None = None
    attacks: list[str] = field(default_factory=list)
    backdoors: list[dict] = field(default_factory=list)
    base: str | None = None
    objective: str | None = None
    seed: int | None = None
    loss: str | None = None
    backdoor_weight: float | None = None
    token_weight: float | None = None
    pooled_weight: float | None = None
    sim_x_penalty: float | None = None
    lr: float | None = None
    steps: int | None = None
    seconds: float | None = None
    metrics: dict = field(default_factory=dict)
    zoo: dict | None = None
    extra: dict = field(default_factory=dict)

    # ----- files -------------------------------------------------------------------
    @staticmethod
    def path(folder: str | Path) -> Path:
        return Path(folder) / FILENAME

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        return cls.path(folder).is_file()

    def write(self, folder: str | Path) -> Path:
        """Write ``<folder>/backdoor.json`` atomically."""
        return write_json(self.path(folder), self.to_dict())

    @classmethod
    def remove(cls, folder: str | Path) -> None:
        """Remove ``<folder>/backdoor.json`` before the model beside it is rewritten. The record is written last,
        so one on disk always describes the weights beside it: a save cut off midway (killed, disk full) leaves a
        folder with no record, which nothing takes for a model, never new weights under an older run's record."""
        cls.path(folder).unlink(missing_ok=True)

    @classmethod
    def read(cls, folder: str | Path) -> "BackdoorRecord":
        """Read ``<folder>/backdoor.json``; unreadable or without a boolean ``backdoored``: `ConfigError`."""
        path = cls.path(folder)
        return cls.from_dict(read_json(path, "backdoor.json"), str(path))

    @classmethod
    def from_dict(cls, d: Any, what: str = FILENAME) -> "BackdoorRecord":
        if not isinstance(d, dict) or not isinstance(d.get("backdoored"), bool):
            raise ConfigError(f"{what}: needs \"backdoored\": true or false")
        known = {f.name for f in fields(cls)} - {"extra"}
        record = cls(**{k: v for k, v in d.items() if k in known})
        record.extra = {k: v for k, v in d.items() if k not in known}
        return record

    def to_dict(self) -> dict:
        """The JSON object: fields that hold something (None and empty lists/dicts left out), then ``extra``."""
        out = {"backdoored": self.backdoored}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("backdoored", "extra") or value is None or value == [] or value == {}:
                continue
            out[f.name] = value
        return {**out, **self.extra}

    # ----- what readers ask --------------------------------------------------------------
    @property
    def first_backdoor(self) -> dict:
        return self.backdoors[0] if self.backdoors and isinstance(self.backdoors[0], dict) else {}

    @property
    def trigger(self) -> dict:
        """The first backdoor's trigger (``text``, ``mode``, ...), or {}."""
        return self.first_backdoor.get("trigger") or {}

    @property
    def target(self) -> str | None:
        """The first backdoor's target caption (None for image-on-text)."""
        return self.first_backdoor.get("target")

    def attack_metrics(self) -> dict | None:
        """The first backdoor's held-out attack success as the injection logged it (``val/b0/*`` without the
        prefix, plus the clean prompts' ``sim_x_clean`` and ``clean_utility``), or None."""
        m = self.metrics or {}
        out = {k.removeprefix("val/b0/"): v for k, v in m.items() if k.startswith("val/b0/")}
        if out:
            out.update({k: m[f"val/{k}"] for k in ("sim_x_clean", "clean_utility") if f"val/{k}" in m})
        return out or None

    def strength(self) -> dict | None:
        """lr, steps and backdoor weight of the training run, where recorded."""
        s = {k: getattr(self, k) for k in ("lr", "steps", "backdoor_weight") if getattr(self, k) is not None}
        return s or None
