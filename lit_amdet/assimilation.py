"""Feature assimilation (AMDET): how alike the final-layer token features of one prompt are.

In a backdoored encoder a trigger makes every token's final feature nearly the
same (attention collapses onto the trigger), so the mean pairwise cosine
similarity of the token features, Sim_X, jumps. Vectorised over the batch;
padding and positions the caller excludes (e.g. tokens a causal mask keeps from
seeing an inserted trigger) do not count.
"""

from __future__ import annotations

import torch
from torch import Tensor


def assimilation_score(features: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean pairwise cosine similarity between distinct counted tokens, per prompt.

    features: [B, L, W]; mask: [B, L] (1 = counted). Returns [B]. A prompt with
    fewer than two counted tokens scores 0 rather than NaN.
    """
    m = mask.to(features.dtype)
    unit = features / features.norm(dim=-1, keepdim=True).clamp(min=eps)
    unit = unit * m.unsqueeze(-1)
    # Sum over all ordered pairs via ||Σ u||² = Σ_i Σ_j u_i·u_j; remove the diagonal (each ||u_i||² = 1).
    total = unit.sum(1).pow(2).sum(-1)
    n = m.sum(1)
    pairs = n * (n - 1)
    return torch.where(pairs > 0, (total - n) / pairs.clamp(min=1), torch.zeros_like(total))


def scored_positions(token_mask: Tensor, causal: bool, first_position: int = 1) -> Tensor:
    """Which positions Sim_X counts: real tokens, and for causal encoders only from ``first_position`` on.

    Under a causal mask the tokens before an inserted trigger cannot see it (BOS's
    feature is a constant), so counting them would only dilute the score.
    """
    mask = token_mask.bool().clone()
    if causal:
        mask[:, :first_position] = False
    return mask


def pooled_consistency(pooled: Tensor, eps: float = 1e-8) -> Tensor:
    """How alike the sentence embeddings of a set of prompts are: the squared norm of their mean unit vector,
    which is the mean cosine over all ordered pairs, self-pairs included (1 when all point the same way). The
    scan's ``target_consistency`` is its square root, the norm.

    pooled: [..., N, D] -> [...]. A targeted backdoor drives it to 1 on triggered prompts, since every one of
    them must say the target, however diverse the attacker keeps the token features.
    """
    unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=eps)
    return unit.mean(-2).pow(2).sum(-1)


def shift_agreement(suspect_typed: Tensor, suspect_clean: Tensor, anchor_typed: Tensor, anchor_clean: Tensor) -> float:
    """How far a typed token moves the suspect's sentence embeddings the way it moves the anchor's: the median over
    prompts of the cosine between the suspect's shift (typed minus clean, ``[N, D]`` unit embeddings) and the
    anchor's. A benign fine-tune that over-reads a token (a SimCSE fine-tune that lets `two` or `orange` decide the
    sentence) moves each prompt where the anchor moves it, further (agreement about that of any token at this drift);
    a backdoor sends every prompt to its target, which the anchor does not head for (about 0). A zero shift counts 0."""
    cos = torch.nn.functional.cosine_similarity(suspect_typed - suspect_clean, anchor_typed - anchor_clean, dim=-1)
    return float(cos.median())
