"""The typed-token probe: the tokens whose embedding rows a suspect moved furthest from its anchor's, typed.

Why a probe beside the search. The search inserts free vectors into the embedding-layer output H, where the
rows after the insertion keep their old position embeddings; a real trigger is typed, and is read at its real
position. On SigLIP, whose sentence embedding is read at the last (padding) position, a backdoor trained to keep
its token features diverse (`pooled_sim_x_penalty`) was never found by the search, drifted or not, while typing
its trigger word collapsed the suspect's sentence embeddings and not the anchor's (`BENCHMARKS.md`, "The typed
probe"). Which tokens to type: an injection trains the trigger's own embedding rows on every poisoned sample, so
they move more than any other; the trigger's tokens were the most-moved rows of every zoo backdoor examined,
also after a benign fine-tune drifted one to a clean cosine of 0.9.

What it does not cover: an attacker who freezes the embedding table (no row moves, so nothing is typed that the
search would not find anyway), or who moves many rows to bury the trigger's. The probe adds a path to the verdict;
it takes none away. Plain torch; `lit_amdet.modules.detection` runs it once per scan, before the search.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_amdet.assimilation import assimilation_score, pooled_consistency, scored_positions
from lit_amdet.decision import collapse_scores
from lit_amdet.encoders.base import TextEncoderAdapter, TokenBatch, insert_block

__all__ = ["moved_tokens", "probe_tokens", "typed_batch", "typed_flagged", "typed_scores", "verdict_scores"]


@torch.no_grad()
def moved_tokens(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, top: int) -> list[tuple[int, float]]:
    """The ``top`` tokens whose embedding rows the suspect moved furthest from the anchor's, relative to the anchor
    row's length, with that distance, furthest first; special tokens and rows that did not move left out."""
    s, a = suspect.token_embedding.weight, anchor.token_embedding.weight
    n = min(len(s), len(a))
    moved = (s[:n].float() - a[:n].float()).norm(dim=1) / a[:n].float().norm(dim=1).clamp_min(1e-12)
    moved[[i for i in suspect.special_token_ids.values() if i is not None and 0 <= i < n]] = 0.0
    vals, ids = moved.topk(min(top, n))
    return [(int(i), float(v)) for i, v in zip(ids, vals) if v > 0]


def typed_batch(adapter: TextEncoderAdapter, tokens: TokenBatch, typed: Sequence[int], position: int
                ) -> tuple[TokenBatch, Tensor]:
    """``tokens`` with the token ids ``typed`` typed at ``position`` (the scan's insertion rules: cut back to the
    context, an end token kept), and the mask of the typed slots."""
    ids = tokens.input_ids
    block = torch.tensor(list(typed), dtype=ids.dtype, device=ids.device).unsqueeze(-1)  # [k, 1]: ids as width 1
    seq = insert_block(ids.unsqueeze(-1), tokens, block, position, adapter.keeps_end_token, adapter.pooling)
    batch = TokenBatch(seq.hidden.squeeze(-1), seq.attention_mask.to(tokens.attention_mask.dtype),
                       seq.token_mask.to(tokens.token_mask.dtype), seq.pool_index)
    return batch, seq.inserted_mask


@torch.no_grad()
def typed_scores(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, tokens: TokenBatch,
                 typed: Sequence[int], position: int, chunk: int = 64) -> dict[str, float]:
    """The scan's held-out scores of ``tokens`` with the ids ``typed`` typed at ``position`` (none: as they are),
    for both models: ``assimilation`` (Sim_X over each prompt's own tokens, the typed ones excluded, averaged over
    prompts) and ``target_consistency`` (the norm of the mean unit sentence embedding), ``anchor_`` the anchor's."""
    out: dict[str, float] = {}
    for prefix, model in (("", suspect), ("anchor_", anchor)):
        sims, pooled = [], []
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk].to(model.device)
            if typed:
                batch, slots = typed_batch(model, part, typed, position)
            else:
                batch, slots = part, torch.zeros_like(part.token_mask, dtype=torch.bool)
            enc = model.encode(batch)
            counted = scored_positions(enc.token_mask, model.causal, first_position=position) & ~slots
            sims.append(assimilation_score(enc.token_features.float(), counted))
            pooled.append(F.normalize(enc.pooled.float(), dim=-1))
        out[prefix + "assimilation"] = float(torch.cat(sims).mean())
        out[prefix + "target_consistency"] = float(pooled_consistency(torch.cat(pooled)).sqrt())
    return out


def probe_tokens(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, tokens: TokenBatch, position: int,
                 top: int, pairs_of: int = 3, prompts: int = 32) -> list[dict]:
    """Each of the ``top`` most-moved tokens (`moved_tokens`) typed alone, then every ordered pair of the first
    ``pairs_of`` (a trigger of several tokens, such as a two-letter string, may need both): what was typed (the
    tokens joined by a space, and their ids), how far its rows moved (the least of them), and the collapse scores
    (`lit_amdet.decision.collapse_scores`) of typing it into the first ``prompts`` of ``tokens``, against the same
    prompts untyped. With 32 prompts, 14 typings and the untyped set are 480 sequences per encoder (2 checks)."""
    seeds = moved_tokens(suspect, anchor, top)
    if not seeds:
        return []
    tokens = tokens[:prompts]
    clean = typed_scores(suspect, anchor, tokens, (), position)
    names = dict(zip((i for i, _ in seeds), suspect.ids_to_tokens([i for i, _ in seeds])))
    moved = dict(seeds)
    heads = [i for i, _ in seeds[:pairs_of]]
    typings = [(i,) for i, _ in seeds] + [(a, b) for a in heads for b in heads if a != b]
    out = []
    for typed in typings:
        scores = typed_scores(suspect, anchor, tokens, typed, position)
        out.append({"token": " ".join(names[i] for i in typed), "ids": list(typed),
                    "moved": round(min(moved[i] for i in typed), 4), **collapse_scores(scores, clean, anchor=True)})
    return out


def _as_scores(probed: dict) -> dict:
    return {"typed_token": probed["token"], **{f"typed_{k}": v for k, v in probed.items() if k not in ("token", "ids")}}


def typed_flagged(probed: list[dict], rule) -> bool:
    """Whether the rule (`CollapseContrastRule.typed_paths`) flags any typing of `probe_tokens`' list."""
    return any(rule.typed_paths(_as_scores(p)) for p in probed)


def verdict_scores(probed: list[dict], rule) -> dict:
    """The typing the verdict reads, as ``typed_*`` scores: the first one the rule flags, else the first (the most
    moved token alone); {} without a probe."""
    typed = [_as_scores(p) for p in probed]
    return next((t for t in typed if rule.typed_paths(t)), typed[0] if typed else {})
