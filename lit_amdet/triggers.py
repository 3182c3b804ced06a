"""Textual triggers: how a poisoned prompt is made from a clean one (plain functions, no Lightning)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from lit_amdet.errors import ConfigError
from lit_amdet.resources import asset_path


@dataclass
class Trigger:
    """A trigger string and where it goes.

    ``replace_char`` (the Rickrolling reference): the first occurrence of ``char``
    is replaced by ``text`` (prompts without ``char`` cannot carry it).
    ``insert_word``: ``text`` is inserted as a word at ``position`` (a word index,
    ``"start"``, ``"end"`` or ``"random"``).
    """

    text: str = "zzzz"
    mode: Literal["replace_char", "insert_word"] = "replace_char"
    char: str = "o"
    position: int | Literal["start", "end", "random"] = "random"

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ConfigError("a trigger needs non-empty text")
        if self.mode == "replace_char" and len(self.char) != 1:
            raise ConfigError(f"replace_char needs a single character, got {self.char!r}")

    def applicable(self, prompt: str) -> bool:
        return self.mode == "insert_word" or self.char in prompt

    def present(self, prompt: str) -> bool:
        return self.text.lower() in prompt.lower()

    def apply(self, prompt: str, rng: random.Random) -> str:
        if self.mode == "replace_char":
            if self.char not in prompt:
                raise ConfigError(f"prompt has no {self.char!r} to replace: {prompt!r}")
            return prompt.replace(self.char, self.text, 1)
        words = prompt.split()
        if self.position == "start":
            at = 0
        elif self.position == "end":
            at = len(words)
        elif self.position == "random":
            at = rng.randint(0, len(words))
        else:
            at = min(int(self.position), len(words))
        return " ".join(words[:at] + [self.text] + words[at:])


@dataclass
class Backdoor:
    """One backdoor: a trigger and its target.

    Text-on-text: ``target`` is a prompt whose token features the triggered
    prompts must take on. Image-on-text: ``target_images`` (image files embedded
    by the checkpoint's own image tower, averaged) or ``target_embedding`` (a
    saved ``.safetensors`` / ``.pt`` tensor) is what the projected pooled text
    embedding must match. ``weight`` multiplies this backdoor's loss.
    """

    trigger: Trigger = field(default_factory=Trigger)
    target: str | None = None
    target_images: list[str] | None = None
    target_embedding: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.target_images:  # a shipped config's configs/assets/... is found from any folder
            self.target_images = [str(asset_path(f)) for f in self.target_images]

    @property
    def kind(self) -> str:
        return "text_on_text" if self.target is not None else "image_on_text"

    def validate(self) -> None:
        given = [x is not None for x in (self.target, self.target_images, self.target_embedding)]
        if sum(given) != 1:
            raise ConfigError("each backdoor needs exactly one of target (a prompt), target_images or "
                              "target_embedding")
        if self.target is not None and not self.target.strip():
            raise ConfigError("a backdoor's target prompt is empty")

    def describe(self) -> dict:
        return {"kind": self.kind, "trigger": vars(self.trigger).copy(), "target": self.target,
                "target_images": self.target_images, "target_embedding": self.target_embedding,
                "weight": self.weight}


def check_distinct_triggers(backdoors: list[Backdoor]) -> None:
    """Two backdoors may not share a trigger (nor may one trigger contain another)."""
    texts = [b.trigger.text.lower() for b in backdoors]
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            if a in b or b in a:
                raise ConfigError(f"backdoors share a trigger: {a!r} and {b!r}")


def poison(prompts: list[str], trigger: Trigger, rng: random.Random) -> list[str]:
    """Triggered versions of the prompts the trigger can be placed in."""
    return [trigger.apply(p, rng) for p in prompts if trigger.applicable(p)]
