"""Contrastive losses (CLIP InfoNCE, SigLIP sigmoid), plain functions on embeddings.

Retrieval metrics (recall@k) live in `lit_amdet.metrics`.
"""

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
