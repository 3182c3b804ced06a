"""Contrastive losses and retrieval metrics, plain functions on embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_infonce(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP): row i of ``a`` matches row i of ``b``."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.exp() * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def siglip_sigmoid(a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP's pairwise sigmoid loss: +1 on the diagonal, -1 elsewhere, mean over rows."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.exp() * a @ b.T + logit_bias
    labels = 2 * torch.eye(a.shape[0], device=a.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


def recall_at_k(queries: Tensor, keys: Tensor, ks: tuple[int, ...] = (1, 5), block: int = 100) -> dict[int, float]:
    """Recall@k of query i retrieving key i among ``block`` consecutive candidates (blocks of the set).

    The last incomplete block is dropped so every query competes with exactly
    ``block`` candidates (pass ``block=len(queries)`` for the whole set).
    """
    n = (queries.shape[0] // block) * block
    if n == 0:
        raise ValueError(f"need at least {block} pairs for recall among {block}")
    q = F.normalize(queries[:n].float(), dim=-1).view(-1, block, queries.shape[-1])
    k = F.normalize(keys[:n].float(), dim=-1).view(-1, block, keys.shape[-1])
    sims = q @ k.transpose(1, 2)  # [blocks, block, block]
    true = sims.diagonal(dim1=1, dim2=2).unsqueeze(-1)
    rank = (sims > true).sum(-1)  # candidates strictly better than the true key
    return {kk: float((rank < kk).float().mean()) for kk in ks}
