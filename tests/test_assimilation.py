"""Sim_X against a plain double loop."""

from __future__ import annotations

import torch

from lit_amdet.assimilation import assimilation_score, scored_positions


def loop_sim_x(features, mask):
    out = []
    for f, m in zip(features, mask):
        idx = [i for i in range(len(m)) if m[i]]
        sims = [torch.nn.functional.cosine_similarity(f[i], f[j], dim=0)
                for i in idx for j in idx if i != j]
        out.append(torch.stack(sims).mean() if sims else torch.tensor(0.0))
    return torch.stack(out)


def test_matches_loop_with_padding():
    torch.manual_seed(0)
    feats = torch.randn(5, 9, 7, dtype=torch.float64)
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0  # one token: defined as 0
    mask[3, :3] = 0
    feats[4, 6:] = 1e3  # huge padding features must not leak in
    mask[4, 6:] = 0
    torch.testing.assert_close(assimilation_score(feats, mask), loop_sim_x(feats, mask))


def test_identical_tokens_score_one_and_orthogonal_zero():
    same = torch.ones(1, 4, 3)
    assert torch.allclose(assimilation_score(same, torch.ones(1, 4)), torch.ones(1))
    ortho = torch.eye(4).unsqueeze(0)
    assert torch.allclose(assimilation_score(ortho, torch.ones(1, 4)), torch.zeros(1), atol=1e-6)


def test_scored_positions_causal_drops_prefix():
    tm = torch.tensor([[1, 1, 1, 0]])
    assert scored_positions(tm, causal=True, first_position=1).tolist() == [[False, True, True, False]]
    assert scored_positions(tm, causal=False).tolist() == [[True, True, True, False]]
