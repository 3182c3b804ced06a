"""Caption banks: the candidate captions a scan reports as "what the trigger makes the model say".

One home for the 20 everyday target concepts (the zoos' text-on-text targets,
and the demo's candidates) and for the held-out world captions added to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from lit_amdet.datamodules.text_encoder import TextLines
from lit_amdet.errors import ConfigError

#: everyday concepts: the zoo's text-on-text targets and the demo's candidate captions
TARGET_CONCEPTS = ["a white teapot", "a red sports car", "a cat sleeping on a sofa", "a man riding a horse",
                   "a bowl of fruit", "a city skyline at night", "a dog catching a frisbee", "a plate of pasta",
                   "an airplane in the sky", "a wooden chair", "a bicycle leaning on a wall", "a snowy mountain",
                   "a child playing football", "a glass of red wine", "a laptop on a desk", "a sailing boat",
                   "a vase of sunflowers", "an old brick church", "a bowl of ramen", "a pair of running shoes"]

#: the world seed of held-out bank captions; no zoo member or demo model trains on it
CAPTION_BANK_WORLD_SEED = 23


def world_caption_bank(extra: Sequence[str | None] = (), n_world: int = 300) -> list[str]:
    """The benchmark's bank: ``n_world`` captions of the held-out world, every target concept, and ``extra``
    (such as image targets' captions); duplicates dropped, order kept."""
    from lit_amdet.world import World

    texts = World(seed=CAPTION_BANK_WORLD_SEED).captions(n_world) + TARGET_CONCEPTS + [t for t in extra if t]
    return list(dict.fromkeys(texts))


def demo_caption_bank(n_world: int = 300) -> list[str]:
    """The demo's bank: ``n_world`` training-split prompts of the held-out world's DataModule, then the concepts."""
    from lit_amdet.datamodules import TextEncoderDataModule

    dm = TextEncoderDataModule(world_seed=CAPTION_BANK_WORLD_SEED, num_samples=400, with_images=False)
    dm.setup()
    return dm.prompts("train", limit=n_world) + TARGET_CONCEPTS


def caption_bank(path: str | None, fallback: Sequence[str]) -> list[str]:
    """A scan's bank: the captions of the text file ``path`` (one per line), or ``fallback`` (its prompts), each
    once, in order."""
    if path is None:
        return list(dict.fromkeys(fallback))
    if not Path(path).is_file():
        raise ConfigError(f"{path}: caption bank not found")
    return list(dict.fromkeys(TextLines(Path(path)).texts))


@torch.no_grad()
def nearest_captions(encoder, bank: Sequence[str], target: torch.Tensor, max_length: int | None, top: int,
                     known: Mapping[str, torch.Tensor] | None = None) -> list[dict]:
    """The ``top`` captions of ``bank`` whose unit sentence embedding (``encoder``, a `TextEncoderAdapter`) is
    closest in cosine to ``target`` ([D]), with that cosine: what a found trigger makes the model say. ``known``:
    embeddings of some captions by the same encoder at the same ``max_length`` (a scan's default bank is its own
    prompts, whose features its feature caches hold: `lit_amdet.amdet.FeatureCache.pooled`), not encoded again (from
    a bfloat16 feature cache, ``cache_dtype``, their cosines can differ from a fresh pass in the third decimal)."""
    known = known or {}
    new = [c for c in dict.fromkeys(bank) if c not in known]
    encoded = dict(zip(new, torch.cat([encoder.encode(new[i:i + 128], max_length=max_length).pooled.float()
                                       for i in range(0, len(new), 128)]))) if new else {}
    emb = F.normalize(torch.stack([known[c] if c in known else encoded[c] for c in bank]).float(), dim=-1)
    sims = emb @ F.normalize(target.to(emb.device), dim=0)
    vals, idx = sims.topk(min(top, len(bank)))
    return [{"caption": bank[int(i)], "cosine": round(float(v), 4)} for v, i in zip(vals, idx)]
