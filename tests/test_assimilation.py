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


def test_pooled_consistency_is_the_mean_cosine_to_the_mean_direction():
    """Against an explicit loop: (1/N) sum_i cos-weighted... = |mean of unit vectors|^2 = mean over all ordered
    pairs (i, j), self-pairs included, of cos(x_i, x_j)."""
    from lit_amdet.assimilation import pooled_consistency

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g)  # 3 sets of 5 vectors
    got = pooled_consistency(x)
    for s in range(3):
        pairs = [torch.nn.functional.cosine_similarity(x[s, i], x[s, j], dim=0) for i in range(5) for j in range(5)]
        assert abs(float(got[s]) - float(sum(pairs) / len(pairs))) < 1e-5
    same = torch.randn(1, 7, generator=g).repeat(4, 1) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    assert abs(float(pooled_consistency(same)) - 1.0) < 1e-6  # every vector points the same way
    opposite = torch.stack([same[0], -same[0]])
    assert abs(float(pooled_consistency(opposite))) < 1e-6


def test_shift_agreement_is_the_median_cosine_of_the_two_models_per_prompt_shifts():
    """Against an explicit loop over prompts; a suspect that moves every prompt the anchor's way (any amount) agrees
    1, one sent to a fixed target the anchor does not head for about 0 or below, a prompt it does not move counts 0."""
    import statistics

    from lit_amdet.assimilation import shift_agreement

    g = torch.Generator().manual_seed(0)
    s0, s1, a0, a1 = (torch.randn(7, 5, generator=g) for _ in range(4))
    per = [float(torch.dot(s1[i] - s0[i], a1[i] - a0[i]) / ((s1[i] - s0[i]).norm() * (a1[i] - a0[i]).norm()))
           for i in range(7)]
    assert abs(shift_agreement(s1, s0, a1, a0) - statistics.median(per)) < 1e-6
    assert abs(shift_agreement(s0 + 3 * (a1 - a0), s0, a1, a0) - 1.0) < 1e-6
    assert abs(shift_agreement(s0 - (a1 - a0), s0, a1, a0) + 1.0) < 1e-6
    still = s0.clone()
    assert shift_agreement(still, s0, a1, a0) == 0.0
