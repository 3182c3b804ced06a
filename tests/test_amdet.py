"""The scan's math (lit_amdet.amdet): restart layout, feature cache, nearest tokens, textual-inversion rows."""

from __future__ import annotations

import pytest
import torch

from lit_amdet.amdet import (
    HELD_OUT_SUMS,
    FeatureCache,
    PseudoTrigger,
    choose_restart,
    held_out_results,
    nearest_tokens,
    reachable,
    restarts_per_pass_for,
    run_triggered,
    token_embedding_of,
    vocabulary_cosines,
)
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


def test_restarts_at_several_slots_are_each_run_at_their_own(tiny_models):
    """`run_slotted`: rows at position 1 and at the end, in one call, equal each slot's rows run alone, in the
    restart-major order of the rows; the end rows are typed (`encode_typed`), so they differ from position 1."""
    from lit_amdet.amdet import run_slotted
    from lit_amdet.encoders import END

    siglip = load_encoder(tiny_models["siglip"]).eval()
    batch = FeatureCache.build(siglip, prompts(), max_length=16).batch(slice(0, 5))
    vectors = PseudoTrigger(3, 1, siglip.width, scale=0.05, seed=1).vectors.detach()
    mixed = run_slotted(siglip, siglip, batch, vectors, [1, 1, END])
    first = run_triggered(siglip, siglip, batch, vectors[:2], position=1)
    end = run_triggered(siglip, siglip, batch, vectors[2:], position=END)
    for name in ("assimilation", "anchor_cos", "anchor_pooled_cos", "pooled"):
        torch.testing.assert_close(getattr(mixed, name), torch.cat([getattr(first, name), getattr(end, name)]))
    at_one = run_triggered(siglip, siglip, batch, vectors[2:], position=1)
    assert not torch.allclose(end.pooled, at_one.pooled, atol=1e-4)
    # an end restart's trigger is a table row: its nearest tokens are read off the table, in chunks
    from lit_amdet.amdet import vocabulary_cosines

    whole = torch.nn.functional.cosine_similarity(siglip.token_embedding.weight, vectors[2], dim=-1)
    torch.testing.assert_close(vocabulary_cosines(siglip, vectors[2, 0], END, chunk=1000), whole)


@pytest.mark.parametrize("family", ["clip", "siglip", "bert"])
def test_the_caches_sentence_embeddings_are_a_fresh_forwards_and_the_caption_bank_reuses_them(tiny_models, family):
    """`FeatureCache.pooled` pools and projects the cached features as a forward pass does (SigLIP: at its last
    padded position, CLIP: the end token, BERT: the mean), so `nearest_captions` takes them for the captions that
    are the scan's own prompts and encodes only the rest, with the same answer as encoding every caption."""
    from lit_amdet.captions import nearest_captions

    model = load_encoder(tiny_models[family]).eval()
    cache = FeatureCache.build(model, prompts(), max_length=16, room=2)
    pooled = cache.pooled(model)
    assert list(pooled) == prompts()
    with torch.no_grad():
        fresh = model.encode(prompts(), max_length=16).pooled.float()
    torch.testing.assert_close(torch.stack(list(pooled.values())), fresh, atol=1e-5, rtol=1e-5)
    bank = ["a green canvas", *prompts(), "a dog on a red table"]
    target = fresh[2] + 0.3 * fresh[0]
    asked = []
    encode = model.encode

    def counting(texts, max_length=None):
        asked.extend(texts)
        return encode(texts, max_length=max_length)

    model.encode = counting
    reused = nearest_captions(model, bank, target, 16, top=4, known=pooled)
    assert asked == ["a green canvas", "a dog on a red table"]
    every = nearest_captions(model, bank, target, 16, top=4)
    assert [c["caption"] for c in reused] == [c["caption"] for c in every]
    assert [c["cosine"] for c in reused] == pytest.approx([c["cosine"] for c in every], abs=2e-4)


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


def test_vocabulary_cosines_in_chunks_match_the_whole_table(clip):
    """Streamed 1,000 tokens at a time, against every token's H row at the slot built at once and compared by
    hand (dot product over norms)."""
    slot = 2
    vector = torch.randn(clip.width, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(clip.vocab_size)
    seq = torch.zeros(len(ids), slot + 1, dtype=torch.long)
    seq[:, slot] = ids
    with torch.no_grad():
        table = clip.embed(seq)[:, slot].double()
    expected = table @ vector.double() / (table.norm(dim=1) * vector.double().norm())
    got = vocabulary_cosines(clip, vector, slot, chunk=1000)
    assert got.shape == (clip.vocab_size,)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_bert_has_no_textual_inversion_row(tiny_models):
    bert = load_encoder(tiny_models["bert"]).eval()
    assert token_embedding_of(bert, torch.zeros(1, bert.width), 1) is None
    h_row = bert.embed(torch.tensor([[101, 2000]]))[0, 1].detach()
    assert nearest_tokens(bert, h_row[None], 1, top=1)[0][0]["id"] == 2000




def pairwise_mean_cos(rows: torch.Tensor) -> float:
    """Mean cosine over ordered pairs of distinct rows, by a double loop."""
    unit = torch.nn.functional.normalize(rows.double(), dim=-1)
    n = len(unit)
    return sum(float(unit[i] @ unit[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


@pytest.mark.parametrize("family,position,k", [("clip", 1, 1), ("clip", 2, 2), ("bert", 1, 1)])
def test_scores_never_count_the_inserted_slots(tiny_models, family, position, k):
    """Sim_X, the anchor cosine and the prompt feature are over the prompt's own tokens only: the features at
    the inserted slots are the optimiser's to set, so scoring them would let the search score its own vectors."""
    suspect = load_encoder(tiny_models[family]).eval()
    anchor = load_encoder(tiny_models[family]).eval()
    with torch.no_grad():  # an anchor that differs from the suspect
        for p in anchor.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cache = FeatureCache.build(suspect, prompts()[:3], max_length=16, room=k)
    batch = cache.batch(slice(0, 3))
    vectors = torch.randn(1, k, suspect.width) * 3
    with torch.no_grad():
        out = run_triggered(suspect, anchor, batch, vectors, position=position)
        block = vectors.repeat_interleave(3, dim=0)
        s = suspect.encode_embeddings(batch.hidden, batch.tokens, insert=block, position=position)
        a = anchor.encode_embeddings(batch.hidden, batch.tokens, insert=block, position=position)
    for i in range(3):
        real = s.token_mask[i].bool().nonzero().flatten().tolist()
        first = position if suspect.causal else 0
        kept = [j for j in real if j >= first and not position <= j < position + k]
        assert len(kept) >= 2
        feats, a_feats = s.token_features[i, kept].float(), a.token_features[i, kept].float()
        assert out.assimilation[i] == pytest.approx(pairwise_mean_cos(feats), abs=1e-5)
        assert out.anchor_assimilation[i] == pytest.approx(pairwise_mean_cos(a_feats), abs=1e-5)
        cos = torch.nn.functional.cosine_similarity(feats, a_feats, dim=-1).mean()
        assert out.anchor_cos[i] == pytest.approx(float(cos), abs=1e-5)
        mean = torch.nn.functional.normalize(feats.mean(0), dim=0)
        torch.testing.assert_close(out.prompt_feature[i], mean, atol=1e-5, rtol=1e-5)


def test_choose_restart_prefers_a_passing_restart():
    assert choose_restart([0.5, -1.0, 0.2], passed=[0, 2]) == 2  # the passing one with the lowest loss
    assert choose_restart([0.5, -1.0, 0.2], passed=[]) == 1  # none passed: the lowest loss
    assert choose_restart([0.0, 0.0], passed=[]) == 0


def test_reachable_carries_the_recent_gain_to_the_step_limit():
    # undecided until two checks after the random start have measured a gain of the search itself
    assert reachable([0.0, 0.1], checks_left=1) and reachable([0.0, 0.1, 0.1], checks_left=0) is False
    # 0.4 now, last gains 0.05 and 0.02: 0.4 + 5 * 2 * 0.05 = 0.9 < 1 -> cannot reach; 7 checks left -> 1.1, can
    history = [0.0, 0.33, 0.38, 0.40]
    assert not reachable(history, checks_left=5) and reachable(history, checks_left=7)
    assert reachable(history, checks_left=10, speedup=1.0) is False  # 0.4 + 10 * 0.05 = 0.9 without the allowance
    assert reachable(history, checks_left=5, window=3)  # the 0.33 climb in the window: 0.4 + 5 * 2 * 0.33
    assert reachable([0.0, 0.2, 1.0], checks_left=0)  # on the threshold: flagged, never dropped
    assert not reachable([0.0, 0.5, 0.4, 0.3], checks_left=100)  # falling: no gain to carry
    # the measured SigLIP search that sped up (0.01, 0.10, 0.30, 2.00 at checks 1-4): kept at every check
    curve = [0.02, 0.01, 0.10, 0.30, 2.00]
    assert all(reachable(curve[:c + 1], checks_left=10 - c) for c in range(1, 5))
    assert not reachable(curve[:3], checks_left=8, speedup=1.0)  # a bound without the allowance drops it


def test_pooled_restarts_objective_is_the_suspects_pooled_consistency_plus_the_contrast(clip):
    """The pooled restarts' loss (`role_losses`, role ``pooled``) per restart against an explicit computation from
    the same forward pass."""
    import torch.nn.functional as F

    def consistency(x):
        unit = F.normalize(x, dim=-1)
        return float(sum(float(unit[i] @ unit[j]) for i in range(len(x)) for j in range(len(x))) / len(x) ** 2)

    cache = FeatureCache.build(clip, prompts(), max_length=None, room=1)
    batch = cache.batch(slice(None))
    vectors = PseudoTrigger(2, 1, clip.width, scale=0.02, seed=1).vectors.detach()
    out = run_triggered(clip, clip, batch, vectors, position=1)
    n = len(prompts())
    from lit_amdet.amdet import role_losses

    got = role_losses(out, ["pooled", "pooled"], beta=0.1, gamma=0.2, pooled_gamma=0.3, charge=0.7)
    no_anchor = run_triggered(clip, None, batch, vectors, position=1)
    alone = role_losses(no_anchor, ["pooled", "pooled"], beta=0.1, gamma=0.2, pooled_gamma=0.3, charge=0.7)
    for r in range(2):
        rows = slice(r * n, (r + 1) * n)
        want = -consistency(out.pooled[rows]) + 0.3 * float(out.anchor_pooled_cos[rows].mean())
        assert float(got[r]) == pytest.approx(want, abs=1e-5)
        assert float(alone[r]) == pytest.approx(-consistency(no_anchor.pooled[rows]), abs=1e-5)


def test_each_role_optimises_its_own_objective(tiny_models, clip):
    """`role_losses` per restart against the objectives written out from the same forward pass, and
    `held_out_loss` from the scan's summed scores; the suspect and the anchor are different models."""
    import torch.nn.functional as F

    from lit_amdet.amdet import held_out_loss, restart_roles, role_losses

    def consistency(x):
        unit = F.normalize(x.float(), dim=-1)
        return float(unit.mean(0) @ unit.mean(0))

    anchor = load_encoder(tiny_models["clip_other"]).eval() if "clip_other" in tiny_models else None
    if anchor is None:  # a second model of the same architecture: the suspect with its weights perturbed
        anchor = load_encoder(tiny_models["clip"]).eval()
        with torch.no_grad():
            for p in anchor.parameters():
                p.add_(0.05 * torch.randn_like(p))
    roles = restart_roles(restarts=2, pooled_restarts=1, null_restarts=1, token_null_restarts=1)
    assert roles == ["amdet", "pooled", "charged", "null", "token_null"]
    cache = FeatureCache.build(clip, prompts(), max_length=None, room=1)
    vectors = PseudoTrigger(5, 1, clip.width, scale=0.02, seed=1).vectors.detach()
    out = run_triggered(clip, anchor, cache.batch(slice(None)), vectors, position=1)
    got = role_losses(out, roles, beta=0.1, gamma=0.2, pooled_gamma=0.3, charge=0.7)
    n = len(prompts())
    amdet = out.loss(0.1, 0.2, 0.3)
    for r, role in enumerate(roles):
        rows = slice(r * n, (r + 1) * n)
        s, a = consistency(out.pooled[rows]), consistency(out.anchor_pooled[rows])
        cos = float(out.anchor_pooled_cos[rows].mean())
        # the swapped AMDET loss, written out from the anchor's per-row Sim_X and the two cosines
        token_cos = float(out.anchor_cos[rows].mean())
        want = {"amdet": float(amdet[rows].mean()), "pooled": -s + 0.3 * cos, "charged": -s + 0.3 * cos + 0.7 * a,
                "null": -a + 0.3 * cos + 0.7 * s,
                "token_null": -float(out.anchor_assimilation[rows].mean()) + 0.2 * token_cos + 0.3 * cos}[role]
        assert float(got[r]) == pytest.approx(want, abs=1e-5), role
    scores = {"target_consistency": 0.9, "anchor_target_consistency": 0.5, "anchor_pooled_cos": 0.4}
    assert held_out_loss("amdet", scores, 0.3, 0.7, 0.2) is None
    assert held_out_loss("charged", scores, 0.3, 0.7, 0.2) == pytest.approx(-0.81 + 0.12 + 0.7 * 0.25)
    assert held_out_loss("null", scores, 0.3, 0.7, 0.2) == pytest.approx(-0.25 + 0.12 + 0.7 * 0.81)
    swapped = {"anchor_assimilation": 0.6, "anchor_cos": 0.5, "anchor_pooled_cos": 0.4}
    assert held_out_loss("token_null", swapped, 0.3, 0.7, 0.2) == pytest.approx(-0.6 + 0.2 * 0.5 + 0.3 * 0.4)


def test_held_out_results_are_means_per_prompt_from_the_sums():
    """Two restarts' sums over 4 and 2 prompts, against the per-prompt values they were summed from."""
    torch.manual_seed(0)
    per_prompt = [torch.rand(4, len(HELD_OUT_SUMS) - 1), torch.rand(2, len(HELD_OUT_SUMS) - 1)]
    pooled = [torch.nn.functional.normalize(torch.randn(len(p), 5), dim=-1) for p in per_prompt]
    sums = torch.stack([torch.cat([torch.tensor([float(len(p))]), p.sum(0)]) for p in per_prompt]).double()
    got = held_out_results(sums, torch.stack([p.sum(0) for p in pooled]).double(),
                           torch.zeros(2, 5, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64), False)
    for r, (p, u) in enumerate(zip(per_prompt, pooled)):
        mean = dict(zip(HELD_OUT_SUMS[1:], p.mean(0).tolist()))
        assert got[r]["prompts"] == len(p) and got[r]["loss"] == pytest.approx(mean["loss"])
        assert got[r]["assimilation_ratio"] == pytest.approx(mean["assimilated"])
        assert got[r]["same_target_mean_cos"] == pytest.approx(mean["same_cos"])
        assert got[r]["target_consistency"] == pytest.approx(float(u.mean(0).norm()), abs=1e-6)
        assert got[r]["anchor_cos"] is None and got[r]["anchor_target_consistency"] is None  # no anchor
        assert torch.allclose(got[r]["_feature"], torch.full((3,), 1 / len(p)))


def test_restarts_per_pass_holds_a_pass_graph_under_the_budget():
    """`restarts_per_pass_for`: the most restarts whose graph (80 bytes per tower, prompt, position, width unit
    and layer) fits the budget, at least one; the shipped budget keeps a ViT-L/14-sized pass at the 2 restarts its
    3 GB scan was measured with, and runs every restart of a MiniLM-sized tower at once."""
    for batch, positions, width, depth, towers in ((8, 33, 768, 12, 2), (8, 33, 512, 12, 2), (8, 33, 384, 6, 2),
                                                    (4, 64, 128, 4, 1)):
        one = 80 * batch * positions * width * depth * towers
        for k in (1, 2, 5):
            assert restarts_per_pass_for(batch, positions, width, depth, towers, budget=k * one) == k
            assert restarts_per_pass_for(batch, positions, width, depth, towers, budget=k * one - 1) == max(k - 1, 1)
    assert restarts_per_pass_for(8, 33, 768, 12) == 2   # ViT-L/14 text
    assert restarts_per_pass_for(8, 33, 512, 12) == 3   # ViT-B/32 text
    assert restarts_per_pass_for(8, 33, 384, 6) >= 5    # the MiniLM: every restart of the scan
