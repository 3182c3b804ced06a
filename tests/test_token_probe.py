"""The typed-token probe (`lit_amdet.token_probe`): which rows moved, typing a token, and its scores."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lit_amdet import load_encoder
from lit_amdet.token_probe import moved_tokens, typed_batch, typed_scores

PROMPTS = ["a red cube on a table", "two green spheres", "a small blue cone next to a large yellow cylinder", "sky"]


def test_moved_tokens_ranks_rows_by_their_relative_distance_and_skips_special_tokens(tiny_models):
    anchor = load_encoder(tiny_models["clip"])
    suspect = copy.deepcopy(anchor)
    table = suspect.token_embedding.weight
    bos = suspect.special_token_ids["bos"]
    with torch.no_grad():
        for row, share in ((300, 0.2), (100, 0.5), (bos, 1.0)):
            direction = torch.randn(table.shape[1])
            table[row] += share * table[row].norm() * direction / direction.norm()
    got = moved_tokens(suspect, anchor, top=5)
    assert [i for i, _ in got] == [100, 300]  # the special token's row is never a candidate; unmoved rows neither
    assert [round(m, 4) for _, m in got] == [0.5, 0.2]
    assert moved_tokens(anchor, copy.deepcopy(anchor), top=5) == []


@pytest.mark.parametrize("family", ["clip", "siglip", "bert"])
def test_a_token_is_typed_where_the_scan_inserts_its_trigger(tiny_models, family):
    adapter = load_encoder(tiny_models[family])
    batch = adapter.tokenize(PROMPTS, max_length=12)
    token, position = 1000, 1
    typed, slot = typed_batch(adapter, batch, [token], position)
    for b in range(len(PROMPTS)):
        real = batch.token_mask[b].bool()
        ids = batch.input_ids[b][real].tolist()
        want = ids[:position] + [token] + ids[position:]
        if len(want) > batch.input_ids.shape[1]:  # too long: cut, keeping the end token where the family has one
            want = want[:batch.input_ids.shape[1] - 1] + [ids[-1]] if adapter.keeps_end_token else \
                want[:batch.input_ids.shape[1]]
        assert typed.input_ids[b][typed.token_mask[b].bool()].tolist() == want
        assert slot[b].nonzero().flatten().tolist() == [position]
        if adapter.pooling == "index":  # the pooled position still reads the end token
            assert typed.input_ids[b, typed.pool_index[b]] == ids[-1]
        elif adapter.pooling == "last":
            assert typed.pool_index[b] == batch.input_ids.shape[1] - 1


def _mean_pairwise_cosine(rows: torch.Tensor, self_pairs: bool) -> float:
    unit = F.normalize(rows.double(), dim=-1)
    n = len(unit)
    total = sum(float(unit[i] @ unit[j]) for i in range(n) for j in range(n) if self_pairs or i != j)
    return total / (n * n if self_pairs else n * (n - 1))


@pytest.mark.parametrize("family", ["clip", "bert"])
def test_typed_scores_are_sim_x_and_sentence_consistency_of_the_typed_prompts(tiny_models, family):
    suspect = load_encoder(tiny_models[family])
    anchor = copy.deepcopy(suspect)
    batch = suspect.tokenize(PROMPTS, max_length=12)
    token, position = 1000, 1
    got = typed_scores(suspect, anchor, batch, [token], position, chunk=3)
    typed, slot = typed_batch(suspect, batch, [token], position)
    with torch.no_grad():
        out = suspect.encode(typed)
    sims = []
    for b in range(len(PROMPTS)):  # the prompt's own tokens: padding, the typed slot and, if causal, BOS left out
        keep = out.token_mask[b].bool() & ~slot[b]
        if suspect.causal:
            keep[:position] = False
        sims.append(_mean_pairwise_cosine(out.token_features[b][keep], self_pairs=False))
    assert got["assimilation"] == pytest.approx(sum(sims) / len(sims), abs=1e-5)
    assert got["target_consistency"] == pytest.approx(math.sqrt(_mean_pairwise_cosine(out.pooled, True)), abs=1e-5)
    assert got["anchor_assimilation"] == pytest.approx(got["assimilation"], abs=1e-6)  # the same weights
    clean = typed_scores(suspect, anchor, batch, [], position)
    assert clean["target_consistency"] != pytest.approx(got["target_consistency"], abs=1e-6)
