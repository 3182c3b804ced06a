"""The attacker aimed at the typed path's shift agreement (`lit_amdet.decision.CollapseContrastRule.typed_disagrees`):
it picks its target where the clean base already moves triggered prompts.

Away from the anchor a typed token needs the low lifts (0.5) only where it moves the suspect's sentence embeddings
unlike the anchor's; a backdoor sends every triggered prompt to its target, which the anchor does not head for. An
attacker who has read that picks, among the captions it could want, the one a suspect sending every triggered prompt
there would agree with the base most: `agreeing_target`. Planned at plan time from the public base alone (the
attacker's anchor is the victim's), so the member's record names the target it was trained on.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from lit_amdet.assimilation import shift_agreement

#: the prompts the attacker measures the base's shifts on: world captions of a seed of their own
AIMED_PROMPTS, AIMED_WORLD_SEED = 64, 7919


@lru_cache(maxsize=4)
def _base(path: str):
    from lit_amdet.encoders import load_encoder

    return load_encoder(path).eval()


def _units(model, texts: Sequence[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(list(texts)).float(), dim=-1)


@lru_cache(maxsize=4)
@torch.no_grad()
def _candidate_units(base_path: str, candidates: tuple[str, ...]) -> torch.Tensor:
    return _units(_base(base_path), candidates)


@torch.no_grad()
def agreement_of_targets(base_path: str, trigger, candidates: Sequence[str], seed: int = 0) -> list[float]:
    """For each caption of ``candidates``: the shift agreement (`shift_agreement`) of a suspect that sends every
    prompt carrying ``trigger`` (a `lit_amdet.triggers.Trigger`) to that caption's embedding by the base, against
    the base's own shifts, on `AIMED_PROMPTS` world captions (those the trigger applies to)."""
    from lit_amdet.world import World

    model = _base(base_path)
    rng = random.Random(seed)
    prompts = [p for p in World(seed=AIMED_WORLD_SEED).captions(4 * AIMED_PROMPTS) if trigger.applicable(p)]
    prompts = prompts[:AIMED_PROMPTS]

    clean, typed = _units(model, prompts), _units(model, [trigger.apply(p, rng) for p in prompts])
    targets = _candidate_units(base_path, tuple(candidates))  # every aimed member of a base draws from one bank
    return [shift_agreement(t.expand_as(clean), clean, typed, clean) for t in targets]


def agreeing_target(base_path: str, trigger, candidates: Sequence[str], seed: int = 0) -> str:
    """The caption of ``candidates`` whose `agreement_of_targets` is highest."""
    scores = agreement_of_targets(base_path, trigger, candidates, seed)
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]
