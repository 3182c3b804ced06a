"""The scan's math (lit_amdet.amdet): restart layout, feature cache, nearest tokens, textual-inversion rows."""

from __future__ import annotations

import pytest
import torch

from lit_amdet.amdet import FeatureCache, PseudoTrigger, nearest_tokens, run_triggered, token_embedding_of
from lit_amdet.encoders import load_encoder


@pytest.fixture(scope="module")
def clip(tiny_models):
    return load_encoder(tiny_models["clip"]).eval()


def prompts():
    return ["a red cube on a table", "two small blue spheres", "a photo of a dog", "an empty beige canvas",
            "three striped yellow stars next to a big green donut in the top left corner"]


def test_restarts_are_independent_rows(clip):
    cache = FeatureCache.build(clip, prompts(), max_length=16)
    trig = PseudoTrigger(3, 2, clip.width, scale=0.05, seed=1)
    batch = cache.batch(slice(0, 5))
    together = run_triggered(clip, clip, batch, trig.vectors.detach(), position=1)
    for r in range(3):
        alone = run_triggered(clip, clip, batch, trig.vectors.detach()[r:r + 1], position=1)
        torch.testing.assert_close(together.assimilation[r * 5:(r + 1) * 5], alone.assimilation, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(together.orig_cos[r * 5:(r + 1) * 5], alone.orig_cos, atol=1e-5, rtol=1e-5)
    # a restart's loss depends on its own vectors only
    vec = trig.vectors
    out = run_triggered(clip, None, batch, vec, position=1)
    out.loss(0.1, 0.0).reshape(3, 5)[1].mean().backward()
    assert vec.grad[0].abs().max() == 0 and vec.grad[2].abs().max() == 0 and vec.grad[1].abs().max() > 0


def test_cache_matches_a_fresh_forward_and_clean_prompts_compare_to_themselves(clip):
    cache = FeatureCache.build(clip, prompts(), max_length=16, batch_size=2)
    assert cache.hidden.shape[1] <= 16 and len(cache) == 5
    fresh = clip.encode(prompts()[3:5], max_length=16)
    b = cache.batch(slice(3, 5))
    n = b.hidden.shape[1]
    torch.testing.assert_close(b.suspect, fresh.token_features[:, :n], atol=1e-5, rtol=1e-5)
    clean = run_triggered(clip, clip, b, None, position=1)
    torch.testing.assert_close(clean.orig_cos, torch.ones(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clean.anchor_cos, torch.ones(2), atol=1e-5, rtol=1e-5)
    # Sim_X of the clean prompt equals the library function on the native features
    from lit_amdet.assimilation import assimilation_score, scored_positions

    ref = assimilation_score(fresh.token_features, scored_positions(fresh.token_mask, clip.causal, 1))
    torch.testing.assert_close(clean.assimilation, ref, atol=1e-5, rtol=1e-5)


def test_inserting_a_real_token_recovers_it_and_the_textual_inversion_row(clip):
    token_id = 320
    pos = 1
    h_row = clip.embed(torch.tensor([[0, token_id]]))[0, pos].detach()
    found = nearest_tokens(clip, h_row[None], pos, top=3)[0][0]
    assert found["id"] == token_id and found["cosine"] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(token_embedding_of(clip, h_row[None], pos)[0],
                               clip.token_embedding.weight[token_id].float(), atol=1e-6, rtol=1e-6)
    # H is computed once (as in the reference), so later tokens keep their original position embeddings;
    # up to the inserted slot the causal features are those of the prompt that really contains the token
    cache = FeatureCache.build(clip, ["a dog"], max_length=16, room=1)
    out = run_triggered(clip, None, cache.batch(slice(0, 1)), h_row[None, None], position=pos)
    ids = clip.tokenize(["a dog"], max_length=16).input_ids[0]
    spliced = torch.cat([ids[:pos], torch.tensor([token_id]), ids[pos:]])[None, :6]
    native = clip.encode(clip.batch_from_ids(spliced, torch.ones_like(spliced)))
    torch.testing.assert_close(out.features[0, :pos + 1], native.token_features[0, :pos + 1].float(), atol=1e-5,
                               rtol=1e-5)


def test_bert_has_no_textual_inversion_row(tiny_models):
    bert = load_encoder(tiny_models["bert"]).eval()
    assert token_embedding_of(bert, torch.zeros(1, bert.width), 1) is None
    h_row = bert.embed(torch.tensor([[101, 2000]]))[0, 1].detach()
    assert nearest_tokens(bert, h_row[None], 1, top=1)[0][0]["id"] == 2000


