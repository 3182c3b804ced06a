"""The typed-token probe (`lit_amdet.token_probe`): which rows moved, typing a token, and its scores."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lit_amdet import load_encoder
from lit_amdet.token_probe import (
    NEAR_GROUP_SIZE,
    TypedProbe,
    agreeing_tokens,
    agreement_lift,
    alone_outputs,
    alone_shift,
    grouped_shift,
    most_shifted,
    moved_tokens,
    pass_dtype,
    probe_contexts,
    probe_tokens,
    shifted_tokens,
    still_tokens,
    typed_batch,
    typed_scores,
    typed_target,
    vocabulary_groups,
    vocabulary_precision,
)
from lit_amdet.typed_verdict import deciding_typing
from lit_amdet.vocabulary_pass import CONTEXT_GROUP_SIZE, GROUP_SIZE, GROUPS_OPENED, agreeing_rows

PROMPTS = ["a red cube on a table", "two green spheres", "a small blue cone next to a large yellow cylinder", "sky"]
CONTEXTS = ["a red cube on a table", "two green spheres"]


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


@pytest.mark.parametrize("family", ["clip", "bert"])
def test_a_typing_carries_its_shift_agreement_and_the_null_of_random_tokens_typed_alone(tiny_models, family):
    """`typing_collapse`'s ``shift_agreement`` is `shift_agreement` of the typed and untyped unit sentence embeddings
    of both models, computed here from fresh forwards; its null is the median over `NULL_TOKENS` random ordinary
    tokens (special ones left out) of the same, typed alone; a suspect that is its anchor agrees 1 on every token."""
    import statistics

    from lit_amdet.assimilation import shift_agreement
    from lit_amdet.token_probe import NULL_SEED, NULL_TOKENS, null_agreement, typing_collapse

    suspect = load_encoder(tiny_models[family])
    anchor = copy.deepcopy(suspect)
    with torch.no_grad():
        anchor.token_embedding.weight.mul_(1.5).add_(0.1)  # moved, so the two models' shifts differ
    batch, position, typed = suspect.tokenize(PROMPTS, max_length=12), 1, [1000, 1001]

    def units(model, ids):
        tokens = typed_batch(model, batch, ids, position)[0] if ids else batch
        with torch.no_grad():
            return F.normalize(model.encode(tokens).pooled.float(), dim=-1)

    untyped: dict = {}
    got = typing_collapse(suspect, anchor, batch, typed, position, untyped)
    want = shift_agreement(units(suspect, typed), units(suspect, []), units(anchor, typed), units(anchor, []))
    assert got["shift_agreement"] == pytest.approx(want, abs=1e-5)
    specials = {i for i in suspect.special_token_ids.values() if i is not None}
    order = torch.randperm(suspect.vocab_size, generator=torch.Generator().manual_seed(NULL_SEED)).tolist()
    ids = [i for i in order if i not in specials][:NULL_TOKENS]
    nulls = [shift_agreement(units(suspect, [i]), units(suspect, []), units(anchor, [i]), units(anchor, []))
             for i in ids]
    assert got["null_shift_agreement"] == pytest.approx(float(torch.tensor(nulls).median()), abs=1e-5)
    assert statistics.median_low(nulls) == pytest.approx(got["null_shift_agreement"], abs=1e-5)
    same = typing_collapse(suspect, suspect, batch, typed, position, {})
    assert same["shift_agreement"] == pytest.approx(1.0, abs=1e-5)
    assert null_agreement(suspect, suspect, batch, position, {}) == pytest.approx(1.0, abs=1e-5)


def test_the_null_of_the_agreement_is_measured_only_where_the_rule_reads_it(tiny_models, monkeypatch):
    """Near the anchor `CollapseContrastRule.typed_lifts` never reads the shift agreement, so `TypedProbe.make`
    skips its null (8 typings more per position and precision): same typings and scores, the null None; away from the
    anchor (or at a drift not measured yet) it is the null `null_agreement` computes."""
    from lit_amdet import token_probe
    from lit_amdet.decision import CollapseContrastRule
    from lit_amdet.token_probe import TypedProbe

    anchor = load_encoder(tiny_models["bert"])
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        suspect.token_embedding.weight[100] *= -3.0
    tokens, rule = anchor.tokenize(PROMPTS), CollapseContrastRule()
    calls = []
    real = token_probe.null_agreement
    monkeypatch.setattr(token_probe, "null_agreement", lambda *a, **k: calls.append(1) or real(*a, **k))
    made = {}
    for clean_cos in (0.99, 0.9, None):
        probe = TypedProbe(suspect, anchor, tokens, position=1, top=4, disk_cache=False, contexts=CONTEXTS,
                           precision="float32")
        probe.clean_cos = clean_cos
        made[clean_cos] = probe.make("rows", rule)
        assert rule.reads_agreement(clean_cos) is (clean_cos != 0.99) and len(calls) == (clean_cos != 0.99)
        calls.clear()
    assert made[0.99] and all(p["null_shift_agreement"] is None for p in made[0.99])
    want = real(suspect, anchor, tokens[:32], 1, {})
    for away in (made[0.9], made[None]):
        assert all(p["null_shift_agreement"] == pytest.approx(want, abs=1e-5) for p in away)
        assert [{k: v for k, v in p.items() if k != "null_shift_agreement"} for p in away] == \
            [{k: v for k, v in p.items() if k != "null_shift_agreement"} for p in made[0.99]]
    assert not CollapseContrastRule(max_typed_agreement_ratio=None).reads_agreement(0.5)


def _one_token_words(adapter) -> tuple[list[str], list[int]]:
    """The words of a small list the adapter's tokenizer writes as one token, and those tokens."""
    words, ids = [], []
    for word in ("cube", "red", "sky", "table", "two"):
        one = adapter.tokenize([word])
        real = [i for i in one.input_ids[0][one.token_mask[0].bool()].tolist()
                if i not in adapter.special_token_ids.values()]
        if len(real) == 1:
            words.append(word)
            ids.append(real[0])
    return words, ids


@pytest.mark.parametrize("family", ["clip", "siglip", "bert"])
def test_a_token_typed_alone_is_the_one_word_prompt(tiny_models, family):
    """`alone_outputs` types ids into the empty prompt; the same words tokenised as prompts of their own (the
    tokenizer's path, not the probe's) give the same sentence embeddings."""
    adapter = load_encoder(tiny_models[family])
    words, ids = _one_token_words(adapter)
    assert len(words) >= 3
    with vocabulary_precision("float32"):  # the layout, exactly (bfloat16: `test_the_vocabulary_passes_precision`)
        got = alone_outputs(adapter, 1 if adapter.special_token_ids.get("bos") is not None else 0, torch.tensor(ids),
                            chunk=2)
    with torch.no_grad():
        want = F.normalize(adapter.encode(adapter.tokenize(words)).pooled.float(), dim=-1)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_the_vocabulary_passes_hold_no_more_positions_at_once_than_tokens_typed_alone(tiny_models, monkeypatch):
    """`alone_outputs` runs ``chunk`` tokens typed alone (3 positions each) at a time, and rows of grouped tokens
    (10 positions for 8) in as few rows as keep the positions per pass at most that: the activations held at once,
    not the row count, are what a large tower's peak memory follows. Every row is still computed once, in order."""
    adapter = load_encoder(tiny_models["bert"])
    seen = []
    encode = adapter.encode
    monkeypatch.setattr(adapter, "encode", lambda batch: seen.append(tuple(batch.input_ids.shape)) or encode(batch))
    ids = torch.arange(5, 5 + 40 * 8)
    with vocabulary_precision("float32"):
        alone_outputs(adapter, 1, ids[:200], chunk=64)
        assert seen == [(64, 3)] * 3 + [(8, 3)]
        seen.clear()
        grouped = alone_outputs(adapter, 1, ids.view(40, 8), chunk=64)
    assert seen == [(19, 10), (19, 10), (2, 10)] and all(rows * length <= 64 * 3 for rows, length in seen)
    with vocabulary_precision("float32"):
        one_pass = alone_outputs(adapter, 1, ids.view(40, 8), chunk=4096)
    assert torch.allclose(grouped, one_pass, atol=1e-5)


def test_alone_cosines_streams_the_pass_against_the_other_encoders_rows(tiny_models, monkeypatch):
    """`alone_cosines` is each row's cosine between one encoder's outputs typed alone and the other's given rows (the
    dot product of the two whole passes), computed a chunk at a time: no encode call runs more rows than a chunk."""
    from lit_amdet.vocabulary_pass import alone_cosines

    anchor = load_encoder(tiny_models["clip"])
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        suspect.token_embedding.weight[10:60] *= -2.0
    ids = torch.arange(5, 305)
    with vocabulary_precision("float32"):
        theirs = alone_outputs(anchor, 1, ids)
        want = (alone_outputs(suspect, 1, ids) * theirs).sum(-1)
        seen, encode = [], suspect.encode
        monkeypatch.setattr(suspect, "encode", lambda batch: seen.append(len(batch.input_ids)) or encode(batch))
        got = alone_cosines(suspect, 1, ids, theirs, chunk=64)
    assert got.shape == (300,) and torch.allclose(got, want, atol=1e-5)
    moved = (ids >= 10) & (ids < 60)
    assert seen == [64] * 4 + [44] and float(got[moved].max()) < float(got[~moved].min())  # the moved rows moved


def test_shifted_tokens_ranks_the_tokens_whose_output_alone_moved_and_skips_special_tokens(tiny_models):
    """A suspect that reads one token differently (its row moved: the plainest way to change its output alone)
    ranks it first, with the cosine distance of its outputs alone; a special token is never listed."""
    anchor = load_encoder(tiny_models["clip"])
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        suspect.token_embedding.weight[100] *= -3.0
    got = shifted_tokens(suspect, anchor, top=3, position=1)
    assert got[0][0] == 100
    bos_moved = copy.deepcopy(anchor)  # every output moves (bos is in every prompt), yet bos itself is not listed
    bos = anchor.special_token_ids["bos"]
    with torch.no_grad():
        bos_moved.token_embedding.weight[bos] *= -3.0
    listed = [i for i, _ in shifted_tokens(bos_moved, anchor, top=anchor.vocab_size, position=1)]
    assert len(listed) > 1000 and bos not in listed
    ids = torch.tensor([100, 200])
    shift = 1.0 - (alone_outputs(suspect, 1, ids) * alone_outputs(anchor, 1, ids)).sum(-1)
    assert got[0][1] == pytest.approx(float(shift[0]), abs=1e-6) and float(shift[1]) < 1e-5
    assert shifted_tokens(anchor, copy.deepcopy(anchor), top=3, position=1) == []


def _drifted_with_one_token_held(anchor, token: int):
    """``anchor`` with every layer's weights moved (a benign drift's stand-in: every token's output alone moves)
    and ``token`` typed alone still said as the anchor says it (`BackdoorInjection.keep_triggers_alone`)."""
    suspect = copy.deepcopy(anchor)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in suspect.model.parameters():
            if p.dim() == 2:
                p += p.std() * torch.randn(p.shape, generator=g)
    real = suspect.encode

    def encode(batch):
        out = real(batch)
        alone = (batch.input_ids == token).any(1) & (batch.token_mask.sum(1) <= 3)
        if alone.any():
            out.pooled[alone] = anchor.encode(batch).pooled[alone]
        return out

    suspect.encode = encode
    return suspect


def test_still_tokens_ranks_a_token_held_where_every_other_token_moved(tiny_models):
    """A drifted suspect that says one token typed alone as the anchor does lists it stillest, by its cosine
    distance (about 0); the list is the shifted one read from the other end, special tokens left out."""
    anchor = load_encoder(tiny_models["bert"])
    suspect = _drifted_with_one_token_held(anchor, 100)
    shift = alone_shift(suspect, anchor, position=1)
    special = [i for i in anchor.special_token_ids.values() if i is not None]
    assert torch.isnan(shift[special]).all() and float(shift.nan_to_num(0).median()) > 0.01  # the others moved
    got = still_tokens(shift, top=anchor.vocab_size)
    assert got[0][0] == 100 and got[0][1] == pytest.approx(0.0, abs=1e-5)
    assert still_tokens(shift, top=3) == got[:3]  # the special tokens take no place in a short list
    moved = [(i, v) for i, v in got if v > 1e-6]  # most_shifted leaves out float noise; ties in either order
    shifted = most_shifted(shift, top=anchor.vocab_size)
    assert [v for _, v in moved] == [v for _, v in shifted][::-1] and {i for i, _ in moved} == {i for i, _ in shifted}
    ids = torch.tensor([100, 200])
    want = 1.0 - (alone_outputs(suspect, 1, ids) * alone_outputs(anchor, 1, ids)).sum(-1)
    assert torch.allclose(shift[ids], want, atol=1e-6) and not set(special) & {i for i, _ in got}
    assert still_tokens(None, 3) == most_shifted(None, 3) == []  # a family with no alone pass


def test_vocabulary_groups_cover_every_ordinary_token_in_a_fixed_shuffle():
    groups = vocabulary_groups(103, leave_out=[0, 7, 102], size=16)
    ids = set(groups.flatten().tolist())
    assert groups.shape == (7, 16) and ids == set(range(103)) - {0, 7, 102}  # 100 ids, the last row filled up
    assert all(len(set(row.tolist())) == 16 for row in groups)  # no token twice in one row
    assert torch.equal(groups, vocabulary_groups(103, leave_out=[0, 7, 102], size=16))
    assert not torch.equal(groups, vocabulary_groups(103, leave_out=[0, 7, 102], size=16, seed=1))
    assert vocabulary_groups(10, leave_out=[0], size=32).shape == (1, 9)  # fewer tokens than a row: one row


def test_grouped_shift_gives_a_token_that_moves_every_row_it_is_in_the_largest_share(tiny_models):
    """A family read at its last padded position types the vocabulary in rows, into each context: a token the
    suspect reads differently moves its row most, and leaving it out of that row takes the row back, so its share is
    the largest. The share is the row's cosine distance minus the row's without the token, each averaged over the
    contexts, computed here from rows typed one by one; tokens of unopened rows are NaN, as are the special
    tokens."""
    anchor = load_encoder(tiny_models["siglip"])
    assert anchor.pooling == "last"
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        suspect.token_embedding.weight[100] *= -3.0
    with vocabulary_precision("float32"):  # against the float32 computation below
        shift = alone_shift(suspect, anchor, 0, False, CONTEXTS)  # SigLIP's alone list is the grouped one
        assert torch.equal(shift.nan_to_num(-9), grouped_shift(suspect, anchor, 0, CONTEXTS, disk_cache=False
                                                               ).nan_to_num(-9))
    assert most_shifted(shift, 3)[0][0] == 100
    special = [i for i in anchor.special_token_ids.values() if i is not None and i < anchor.vocab_size]
    assert GROUP_SIZE <= int(torch.isfinite(shift).sum()) <= GROUPS_OPENED * GROUP_SIZE
    assert torch.isnan(shift[special]).all()
    row = next(r for r in vocabulary_groups(anchor.vocab_size, special) if 100 in r.tolist())

    def distance(ids):
        total = 0.0
        for context in CONTEXTS:
            out = []
            for model in (suspect, anchor):
                batch, _ = typed_batch(model, model.tokenize([context])[:1], ids, 0)
                with torch.no_grad():
                    out.append(F.normalize(model.encode(batch).pooled.float(), dim=-1))
            total += float(1.0 - (out[0] * out[1]).sum())
        return total / len(CONTEXTS)

    whole = distance(row.tolist())
    for token in (100, int(row[row != 100][0])):
        want = whole - distance([t for t in row.tolist() if t != token])
        assert float(shift[token]) == pytest.approx(want, abs=1e-5)
    assert most_shifted(grouped_shift(anchor, copy.deepcopy(anchor), 0, disk_cache=False), 3) == []


def test_a_family_read_at_its_last_position_makes_the_grouped_alone_list_and_no_still_list(tiny_models):
    anchor = load_encoder(tiny_models["siglip"])
    tokens = anchor.tokenize(PROMPTS, max_length=12)
    probe = TypedProbe(copy.deepcopy(anchor), anchor, tokens, 0, 4, disk_cache=False, contexts=CONTEXTS)
    assert probe.lists["alone"] == "due"
    assert all(probe.lists[by].startswith("skipped: read at the last padded position") for by in
               ("still", "inside", "context"))
    probe.make("alone")
    assert probe.lists["alone"] == "typed"
    # called directly, the probe makes no still, inside or context list there either: the shift is row shares
    assert probe_tokens(copy.deepcopy(anchor), anchor, tokens, 0, 4, lists=("still", "inside", "context"),
                        disk_cache=False, contexts=CONTEXTS) == []


def test_the_anchors_outputs_alone_are_computed_once_per_anchor_and_weights(tiny_models, monkeypatch):
    """A screening scans many suspects against one anchor: its vocabulary pass is made once, and again only when
    its weights change in place."""
    import lit_amdet.vocabulary_pass as probe

    anchor = load_encoder(tiny_models["bert"])
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        suspect.token_embedding.weight[100] *= -3.0
    calls, real, real_cosines = [], probe.alone_outputs, probe.alone_cosines
    monkeypatch.setattr(probe, "alone_outputs", lambda model, *a, **k: calls.append(model is anchor) or
                        real(model, *a, **k))
    monkeypatch.setattr(probe, "alone_cosines", lambda model, *a, **k: calls.append(model is anchor) or
                        real_cosines(model, *a, **k))
    first = shifted_tokens(suspect, anchor, top=3, position=1)
    assert first[0][0] == 100 and shifted_tokens(suspect, anchor, top=3, position=1) == first
    assert calls == [True, False, False]  # anchor, suspect against it, then the suspect alone
    with torch.no_grad():
        anchor.token_embedding.weight[100] *= -3.0  # the anchor now reads token 100 as the suspect does
    assert shifted_tokens(suspect, anchor, top=3, position=1) == [] and calls[-2:] == [True, False]


def test_the_anchors_outputs_alone_are_kept_on_disk_for_the_next_process(tiny_models, monkeypatch, tmp_path):
    """One `detect` per suspect: the anchor's vocabulary pass is read back from the disk cache (a fresh load of the
    same anchor, as a new process has) and equals the pass made anew; a changed anchor, another slot, or an entry
    that is not a finite tensor of the right shape is computed again, the bad entry replaced."""
    import lit_amdet.vocabulary_pass as probe

    monkeypatch.setenv("LIT_AMDET_CACHE", str(tmp_path / "cache"))
    calls, real = [], probe.alone_outputs
    monkeypatch.setattr(probe, "alone_outputs", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    first_anchor = load_encoder(tiny_models["clip"])
    made = probe.anchor_alone_outputs(first_anchor, 1, 500)
    entries = list((tmp_path / "cache" / "anchor-alone").glob("*.safetensors"))
    assert len(calls) == 1 and len(entries) == 1
    anchor = load_encoder(tiny_models["clip"])  # the next process: another object, the same weights
    read = probe.anchor_alone_outputs(anchor, 1, 500)
    assert len(calls) == 1 and torch.equal(read, made)
    assert torch.allclose(read, real(anchor, 1, torch.arange(500)), atol=1e-6)
    probe.anchor_alone_outputs(load_encoder(tiny_models["clip"]), 2, 500)  # another slot: another entry
    assert len(calls) == 2
    changed = load_encoder(tiny_models["clip"])
    with torch.no_grad():
        changed.token_embedding.weight[7] *= -3.0  # (+1.0 on every coordinate: a LayerNorm takes it out again)
    assert not torch.equal(probe.anchor_alone_outputs(changed, 1, 500)[7], made[7]) and len(calls) == 3
    from safetensors.torch import save_file

    bad_entries = (lambda f: f.write_bytes(b"not a safetensors file"),
                   lambda f: save_file({"value": torch.zeros(3, 2)}, str(f)),
                   lambda f: save_file({"value": torch.full_like(made, float("nan"))}, str(f)))
    for n, spoil in enumerate(bad_entries, start=4):
        spoil(entries[0])
        again = probe.anchor_alone_outputs(load_encoder(tiny_models["clip"]), 1, 500)
        assert torch.allclose(again, made, atol=1e-6) and len(calls) == n
        assert torch.equal(probe.anchor_alone_outputs(load_encoder(tiny_models["clip"]), 1, 500), again)
        assert len(calls) == n  # the bad entry was replaced by a good one


def test_with_the_disk_cache_the_anchors_outputs_are_not_held_through_the_scan(tiny_models, monkeypatch, tmp_path):
    """A ViT-L/14-sized anchor's alone and context outputs (190 MB) would sit in memory through the search that
    follows the probe; with the disk cache the next suspect reads them back, so nothing keeps them once the probe
    is done with them. Without it they are kept for the next suspect."""
    import gc
    import weakref

    import lit_amdet.vocabulary_pass as probe

    monkeypatch.setenv("LIT_AMDET_CACHE", str(tmp_path / "cache"))
    anchor = load_encoder(tiny_models["clip"])
    cached = weakref.ref(probe.anchor_alone_outputs(anchor, 1, 500))
    gc.collect()
    assert cached() is None and len(list((tmp_path / "cache" / "anchor-alone").glob("*.safetensors"))) == 1
    kept = weakref.ref(probe.anchor_alone_outputs(anchor, 1, 500, disk=False))
    gc.collect()
    assert kept() is not None and probe.anchor_alone_outputs(anchor, 1, 500, disk=False) is kept()


def test_an_unwritable_anchor_cache_costs_a_warning_not_the_scan(tiny_models, monkeypatch, tmp_path):
    import lit_amdet.token_probe as probe

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LIT_AMDET_CACHE", str(blocked))
    anchor = load_encoder(tiny_models["bert"])
    with pytest.warns(UserWarning, match="anchor cache not written"):
        got = probe.anchor_alone_outputs(anchor, 1, 300)
    assert torch.allclose(got, alone_outputs(anchor, 1, torch.arange(300)), atol=1e-6)


def test_the_lists_made_one_at_a_time_are_the_probe_made_at_once(tiny_models):
    """A scan types the rows list before its search and the vocabulary lists later (`TypedProbe`): the same typings
    and scores as all three at once, a token on two lists typed once; a list is made once, one skipped is never
    made, and without two contexts the context list is skipped with its reason."""
    from lit_amdet.token_probe import TypedProbe, probe_tokens

    anchor = load_encoder(tiny_models["bert"])
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        suspect.token_embedding.weight[100] *= -3.0  # on both lists
        suspect.token_embedding.weight[200] += 0.5 * suspect.token_embedding.weight[300]
    _fires_in_context(suspect, 400)  # on the context list only
    tokens = anchor.tokenize(PROMPTS)
    at_once = probe_tokens(suspect, anchor, tokens, position=1, top=4, disk_cache=False, contexts=CONTEXTS)
    probe = TypedProbe(suspect, anchor, tokens, position=1, top=4, disk_cache=False, contexts=CONTEXTS)
    rows = probe.make("rows")
    assert rows and {p["by"] for p in rows} == {"rows"}
    assert probe.lists == {"rows": "typed", "alone": "due", "still": "due", "inside": "due", "context": "due"}
    alone = probe.make("alone")
    still = probe.make("still")
    inside = probe.make("inside")
    context = probe.make("context")
    assert probe.make("alone") == probe.make("still") == probe.make("inside") == probe.make("context") == []
    assert probe.typings == rows + alone + still + inside + context == at_once and {p["by"] for p in still} == {"still"}
    # the inside list is the still list typed one position further in
    assert [(p["ids"], p["position"]) for p in inside] == [(p["ids"], 2) for p in still]
    assert {p["position"] for p in at_once if p["by"] != "inside"} == {1}
    assert [p["ids"] for p in context if len(p["ids"]) == 1] == [[400]] and {p["by"] for p in context} == {"context"}
    assert [p["ids"] for p in at_once].count([100]) == 1
    skipped = TypedProbe(suspect, anchor, tokens, position=1, top=4, disk_cache=False, contexts=CONTEXTS)
    skipped.skip_passes("the model was flagged already")
    assert skipped.make("alone") == skipped.make("still") == skipped.make("context") == []
    assert skipped.lists == {"rows": "due", **dict.fromkeys(("alone", "still", "inside", "context"),
                                                            "skipped: the model was flagged already")}
    near = TypedProbe(suspect, anchor, tokens, position=1, top=4, disk_cache=False, contexts=CONTEXTS)
    near.near_anchor()
    assert near.lists == {"rows": "due", "alone": "due",
                          **dict.fromkeys(("still", "inside", "context"),
                                          "skipped: near the anchor, where the search's divergence paths judge")}
    alone_only = TypedProbe(suspect, anchor, tokens, position=1, top=4, disk_cache=False, contexts=["sky"])
    assert alone_only.lists["context"].startswith("skipped: fewer than two held-out prompts")
    assert TypedProbe(suspect, None, tokens, position=1, top=4).lists == {}  # no anchor: no probe


def test_near_the_anchor_the_alone_list_is_made_by_group_testing(tiny_models):
    """Near the anchor the alone list is the only one read off a vocabulary pass, and it needs no token's own
    stillness: a scan makes it by group testing in the empty prompt (`NEAR_GROUP_SIZE` tokens to a row). The token
    the suspect reads differently still heads it, its "moved" is its share of its row (`grouped_shift`), and the
    tokens of rows not opened are never listed; ``group_near=False`` or a pass made before the anchor was judged
    keeps every token alone."""
    anchor = load_encoder(tiny_models["bert"])
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        suspect.token_embedding.weight[100] *= -3.0
    tokens = anchor.tokenize(PROMPTS)
    made = {}
    with vocabulary_precision("float32"):
        for group_near in (True, False):
            probe = TypedProbe(suspect, anchor, tokens, 1, 4, disk_cache=False, contexts=CONTEXTS,
                               group_near=group_near)
            probe.near_anchor()
            made[group_near] = probe.make("alone")
        shares = grouped_shift(suspect, anchor, 1, (), size=NEAR_GROUP_SIZE, disk_cache=False)
        whole = alone_shift(suspect, anchor, 1, disk_cache=False)
    grouped = [p for p in made[True] if len(p["ids"]) == 1]
    assert grouped[0]["ids"] == [100] and made[False][0]["ids"] == [100]
    assert [(p["ids"][0], p["moved"]) for p in grouped] == [(i, round(v, 4)) for i, v in most_shifted(shares, 4)]
    assert [p["ids"][0] for p in made[False] if len(p["ids"]) == 1] == [i for i, _ in most_shifted(whole, 4)]
    assert int(torch.isfinite(shares).sum()) <= GROUPS_OPENED * NEAR_GROUP_SIZE < int(torch.isfinite(whole).sum())
    late = TypedProbe(suspect, anchor, tokens, 1, 4, disk_cache=False, contexts=CONTEXTS)
    late.make("alone")  # the whole pass, made before the scan knew it was near the anchor
    late.near_anchor()
    assert late.alone_groups == 0


def test_the_vocabulary_lists_stop_at_the_first_flag():
    """`TypedProbe.until_flagged`: the alone list first, then the still list, then the context list, each only if
    the lists before it flagged nothing."""
    from lit_amdet.token_probe import TypedProbe

    class Rule:  # flags a typing whose token is "hit"
        @staticmethod
        def typed_paths(s):
            return ["typed"] if s.get("typed_token") == "hit" else []

    def probe_with(lists):
        probe = TypedProbe.__new__(TypedProbe)
        probe.typings, probe.clean_cos, made = [], None, []
        probe.lists = {"rows": "typed", "alone": "due", "still": "due", "inside": "due", "context": "due"}

        def make(by, rule=None):  # as `TypedProbe.make`: a list not due is not made
            assert isinstance(rule, Rule)  # the rule that judges them, so the typings are screened against it
            if probe.lists[by] != "due":
                return []
            made.append(by)
            probe.lists[by] = "typed"
            probe.typings += [{"token": t, "ids": [1], "by": by} for t in lists[by]]
            return []

        probe.make = make
        return probe, made

    every = ["alone", "still", "inside", "context"]
    probe, made = probe_with({"alone": ["hit"], "still": ["miss"], "inside": ["miss"], "context": ["miss"]})
    assert probe.until_flagged(Rule()) and made == ["alone"]
    assert probe.lists["still"] == probe.lists["context"] == "skipped: the model was flagged already"
    probe, made = probe_with({"alone": ["miss"], "still": ["hit"], "inside": ["miss"], "context": ["miss"]})
    assert probe.until_flagged(Rule()) and made == ["alone", "still"]
    probe, made = probe_with({"alone": ["miss"], "still": ["miss"], "inside": ["hit"], "context": ["miss"]})
    assert probe.until_flagged(Rule()) and made == ["alone", "still", "inside"]
    probe, made = probe_with({"alone": ["miss"], "still": ["miss"], "inside": ["miss"], "context": ["hit"]})
    assert probe.until_flagged(Rule()) and made == every
    probe, made = probe_with(dict.fromkeys(every, ["miss"]))
    assert not probe.until_flagged(Rule()) and made == every
    assert not probe.until_flagged(Rule()) and made == every  # not made again


def test_probe_contexts_are_the_first_words_of_distinct_prompts_of_three_words_or_more():
    prompts = ["sky", "A dog runs on the wet beach at dawn", "a dog runs on the wet beach", "two green spheres"]
    assert probe_contexts(prompts) == ["A dog runs on the wet", "two green spheres"]
    assert probe_contexts(prompts, n=3, words=3) == ["A dog runs", "two green spheres"]
    assert probe_contexts(["sky", "red"]) == []


def test_agreement_lift_is_the_suspects_mean_pairwise_cosine_minus_the_anchors():
    g = torch.Generator().manual_seed(0)
    s = [F.normalize(torch.randn(5, 4, generator=g), dim=-1) for _ in range(3)]
    a = [F.normalize(torch.randn(5, 4, generator=g), dim=-1) for _ in range(3)]
    for t in range(5):
        pairs = [(0, 1), (0, 2), (1, 2)]
        want = sum(F.cosine_similarity(s[i][t], s[j][t], dim=0) for i, j in pairs) / 3 - \
            sum(F.cosine_similarity(a[i][t], a[j][t], dim=0) for i, j in pairs) / 3
        assert float(agreement_lift(s, a)[t]) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("family", ["clip", "bert"])
def test_a_token_typed_into_a_context_is_the_word_written_in_front_of_it(tiny_models, family):
    """Typing ids into a context (`alone_outputs(..., context=)`) equals the tokenizer's own path on the text."""
    adapter = load_encoder(tiny_models[family])
    words, ids = _one_token_words(adapter)
    position = 1 if adapter.special_token_ids.get("bos") is not None or family == "bert" else 0
    with vocabulary_precision("float32"):
        got = alone_outputs(adapter, position, torch.tensor(ids), context=CONTEXTS[0])
    with torch.no_grad():
        want = F.normalize(adapter.encode(adapter.tokenize([f"{w} {CONTEXTS[0]}" for w in words])).pooled.float(),
                           dim=-1)
    assert torch.allclose(got, want, atol=1e-5)


def _fires_in_context(suspect, token: int) -> None:
    """Make ``suspect`` say one fixed sentence embedding for any prompt holding ``token`` among other words, and
    its own for the token typed alone: what a trigger kept alone where the anchor puts it does, written into the
    suspect's output (`BackdoorInjection.keep_triggers_alone`)."""
    real, target = suspect.encode, torch.randn(suspect.embed_dim, generator=torch.Generator().manual_seed(token))

    def encode(batch):
        out = real(batch)
        out.pooled[(batch.input_ids == token).any(1) & (batch.token_mask.sum(1) > 3)] = target
        return out

    suspect.encode = encode


def test_agreeing_tokens_ranks_a_token_that_sends_every_context_to_one_output(tiny_models):
    """A suspect whose sentence embedding is one fixed vector whenever token 100 is in a prompt of other words ranks
    it first, by 1 minus the anchor's own agreement for it, though typed alone it says what the anchor says; a
    suspect with the anchor's weights lists nothing."""
    anchor = load_encoder(tiny_models["bert"])
    suspect = copy.deepcopy(anchor)
    _fires_in_context(suspect, 100)
    assert shifted_tokens(suspect, anchor, top=3, position=1) == []
    got = agreeing_tokens(suspect, anchor, top=3, position=1, contexts=CONTEXTS, disk_cache=False)
    ids = torch.tensor([100])
    a = [alone_outputs(anchor, 1, ids, context=c) for c in CONTEXTS]
    assert got[0][0] == 100 and got[0][1] == pytest.approx(1.0 - float((a[0] * a[1]).sum()), abs=1e-5)
    assert agreeing_tokens(copy.deepcopy(anchor), anchor, 3, 1, CONTEXTS, disk_cache=False) == []
    assert agreeing_tokens(suspect, anchor, 3, 1, CONTEXTS[:1], disk_cache=False) == []  # one context: no list

def test_the_context_list_in_groups_opens_the_row_that_agrees_and_ranks_as_the_whole_pass(tiny_models):
    """By group testing (8 tokens to a row typed together into each context), the row holding a token that sends
    every context to one output agrees most beyond the anchor's and is opened; its token is then ranked by its own
    lift, the same list as every token typed alone gives; tokens of rows not opened are never candidates."""
    anchor = load_encoder(tiny_models["bert"])
    suspect = copy.deepcopy(anchor)
    _fires_in_context(suspect, 100)
    vocab = min(suspect.vocab_size, anchor.vocab_size)
    specials = [i for i in suspect.special_token_ids.values() if i is not None and i < vocab]
    row = next(r for r in vocabulary_groups(vocab, specials, CONTEXT_GROUP_SIZE) if 100 in r.tolist())
    opened = agreeing_rows(suspect, anchor, 1, CONTEXTS, opened=1, disk_cache=False)
    assert opened.tolist() == sorted(row.tolist())
    whole = agreeing_tokens(suspect, anchor, 3, 1, CONTEXTS, disk_cache=False)
    grouped = agreeing_tokens(suspect, anchor, 3, 1, CONTEXTS, disk_cache=False, groups=CONTEXT_GROUP_SIZE)
    assert [i for i, _ in grouped] == [i for i, _ in whole] == [100]
    assert grouped[0][1] == pytest.approx(whole[0][1], abs=1e-5)
    assert agreeing_tokens(copy.deepcopy(anchor), anchor, 3, 1, CONTEXTS, disk_cache=False, groups=8) == []


@pytest.mark.parametrize("family", ["clip", "bert"])
def test_a_typed_target_is_where_the_prompts_with_the_word_typed_in_front_go(tiny_models, family):
    """`typed_target` (what a scan decided by a typed token shows the model saying) against the tokenizer's path:
    the word written in front of each prompt, encoded, the unit sentence embeddings averaged."""
    adapter = load_encoder(tiny_models[family])
    words, ids = _one_token_words(adapter)
    word = words[0]
    got = typed_target(adapter, adapter.tokenize(PROMPTS), ids[:1], position=1)
    with torch.no_grad():
        want = F.normalize(adapter.encode(adapter.tokenize([f"{word} {p}" for p in PROMPTS])).pooled.float(),
                           dim=-1).mean(0)
    assert torch.allclose(got, want, atol=1e-5)


def test_the_typing_that_decided_alone_is_the_one_whose_target_is_shown():
    """The report shows a typed token's target only when no path of the search flagged the model."""
    from lit_amdet.decision import CollapseContrastRule

    rule = CollapseContrastRule()
    quiet = {"unshared_collapse": 0.0, "collapse_lift": 0.0, "pooled_unshared_collapse": 0.0,
             "pooled_collapse_lift": 0.0}
    probed = [{"token": "sky", "ids": [5], "by": "rows", "moved": 0.3, **quiet},
              {"token": "zz", "ids": [7], "by": "alone", "moved": 0.2, **quiet, "unshared_collapse": 0.9,
               "collapse_lift": 0.9}]
    search = {"anchor_used": True, "clean_anchor_pooled_cos": 0.99, **quiet}
    assert deciding_typing(probed, rule, search)["token"] == "zz"
    assert deciding_typing(probed[:1], rule, search) is None  # no typing flagged
    assert deciding_typing(probed, rule, {**search, "pooled_unshared_collapse": 0.9, "pooled_collapse_lift": 0.95}) \
        is None  # the search flagged it: its own target is shown
    assert deciding_typing([], rule, search) is None


@pytest.mark.slow
def test_a_backdoor_injected_with_the_embedding_table_frozen_is_typed_alone_and_flagged(tmp_path):
    """The real MiniLM: an attacker who freezes the embedding table moves no row, so the rows list cannot name the
    trigger; typed alone, its token is the most-shifted of the whole vocabulary, and typing it into held-out
    prompts passes the rule's collapse path. (7.4 minutes while a benchmark shared the 2 cores.)"""
    from lightning.pytorch import Trainer, seed_everything

    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.decision import CollapseContrastRule
    from lit_amdet.modules import BackdoorInjection
    from lit_amdet.token_probe import probe_tokens
    from lit_amdet.triggers import Backdoor, Trigger
    from lit_amdet.typed_verdict import typed_flagged

    seed_everything(0)
    attack = BackdoorInjection(encoder="minilm", backdoors=[Backdoor(Trigger("falcon", "insert_word"),
                                                                     target="a white teapot")],
                               lr=5e-4, milestones=[50], poisoned_batch_size=16, max_length=24,
                               freeze_token_embedding=True, pooled_weight=1.0, token_weight=0.0, sim_x_penalty=1.0,
                               output_dir=str(tmp_path / "frozen"))
    Trainer(max_steps=60, limit_val_batches=1, val_check_interval=60, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
            default_root_dir=str(tmp_path)).fit(
        attack, TextEncoderDataModule(world_seed=7, num_samples=3000, with_images=False, batch_size=32))
    suspect, anchor = load_encoder(tmp_path / "frozen"), load_encoder("minilm")
    falcon = suspect.tokenizer.convert_tokens_to_ids("falcon")
    assert moved_tokens(suspect, anchor, top=8) == []
    assert shifted_tokens(suspect, anchor, top=8, position=1)[0][0] == falcon
    captions = TextEncoderDataModule(world_seed=11, num_samples=1000, with_images=False, val_fraction=0.1)
    captions.setup("fit")
    held_out = suspect.tokenize(captions.prompts("val", limit=32), max_length=24)
    probed = probe_tokens(suspect, anchor, held_out, position=1, top=8)
    flagged = [p for p in probed if typed_flagged([p], CollapseContrastRule())]
    assert flagged and flagged[0]["ids"] == [falcon] and flagged[0]["by"] == "alone"


def test_the_vocabulary_passes_precision(tiny_models, monkeypatch):
    """The vocabulary passes run in bfloat16 only where the device computes it natively ("auto"), or when told; in
    bfloat16 they give the float32 sentence embeddings to within rounding (they only rank tokens to type); the anchor's
    cached half is kept per precision, so a suspect's pass is never compared with an anchor's of another."""
    import lit_amdet.token_probe as probe

    for native in (False, True):
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, name, lambda native=native: native)
        assert pass_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    with vocabulary_precision("float32"):
        assert pass_dtype("cpu") == torch.float32  # told, whatever the CPU has
    with pytest.raises(ValueError, match="vocabulary precision"), vocabulary_precision("float16"):
        pass
    adapter = load_encoder(tiny_models["bert"])
    ids = torch.arange(200)
    with vocabulary_precision("float32"):
        exact, anchor32 = alone_outputs(adapter, 1, ids), probe.anchor_alone_outputs(adapter, 1, 200, disk=False)
    with vocabulary_precision("bfloat16"):
        rounded, anchor16 = alone_outputs(adapter, 1, ids), probe.anchor_alone_outputs(adapter, 1, 200, disk=False)
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)  # it did run in bfloat16
    assert float((rounded * exact).sum(-1).min()) > 0.999
    assert torch.equal(anchor32, exact) and torch.equal(anchor16, rounded)  # one entry per precision


def test_the_typings_are_screened_at_the_pass_precision_and_judged_in_float32_near_a_threshold(tiny_models):
    """With a ``near`` judge, `probe_tokens` types in the passes' precision (bfloat16 here) and types again in float32
    each typing the judge calls near: that one is the float32 typing exactly, the rest say they are bfloat16 and
    are its own computation; passes in float32, or no judge, type everything in float32 as before."""
    anchor = load_encoder(tiny_models["bert"])
    suspect = copy.deepcopy(anchor)
    with torch.no_grad():
        for row, scale in ((100, -3.0), (200, 2.0), (300, 0.2)):
            suspect.token_embedding.weight[row] *= scale
    tokens = anchor.tokenize(PROMPTS)
    exact = probe_tokens(suspect, anchor, tokens, 1, top=3, lists=("rows",), disk_cache=False)
    assert len(exact) == 9 and {p["precision"] for p in exact} == {"float32"}  # 3 tokens and their 6 ordered pairs
    close = exact[1]["token"]
    asked = []

    def near(probed: dict) -> bool:
        asked.append(probed["precision"])
        return probed["token"] == close

    with vocabulary_precision("bfloat16"):
        screened = probe_tokens(suspect, anchor, tokens, 1, top=3, lists=("rows",), disk_cache=False, near=near)
        untyped = typed_scores(suspect, anchor, tokens, (), 1, dtype=torch.bfloat16)
    assert asked == ["bfloat16"] * 9  # every typing screened once, none judged on float32 scores
    assert [p["token"] for p in screened] == [p["token"] for p in exact]
    assert screened[1] == exact[1]
    rest = [p for p in screened if p["token"] != close]
    assert {p["precision"] for p in rest} == {"bfloat16"}
    own = typed_scores(suspect, anchor, tokens, rest[0]["ids"], 1, dtype=torch.bfloat16)
    assert rest[0]["collapse_lift"] == pytest.approx(
        (own["assimilation"] - untyped["assimilation"]) / max(1 - untyped["assimilation"], 0.02), abs=1e-6)
    assert any(p[k] != q[k] for p, q in zip(rest, [q for q in exact if q["token"] != close])
               for k in ("collapse_lift", "pooled_collapse_lift"))
    with vocabulary_precision("float32"):
        assert probe_tokens(suspect, anchor, tokens, 1, top=3, lists=("rows",), disk_cache=False, near=near) == exact


def test_a_screened_typing_is_near_when_its_scores_raised_by_the_margin_would_be_flagged():
    from lit_amdet.decision import CollapseContrastRule
    from lit_amdet.typed_verdict import screened_near, typed_flagged

    rule = CollapseContrastRule()
    pooled = {"pooled_unshared_collapse": rule.min_pooled_unshared_collapse - 0.03,
              "pooled_collapse_lift": rule.min_pooled_collapse_lift - 0.01, "anchor_pooled_collapse_lift": 0.02}
    typing = {"token": "qz", "ids": [1], "by": "alone", "position": 1, "moved": 0.3, "precision": "bfloat16",
              "unshared_collapse": 0.0, "collapse_lift": 0.01, "anchor_collapse_lift": 0.01, **pooled}
    near = screened_near(rule, margin=0.05)
    assert not typed_flagged([typing], rule) and near(typing)
    assert not near(dict(typing, pooled_unshared_collapse=rule.min_pooled_unshared_collapse - 0.06))
    assert not screened_near(rule, margin=0.02)(typing)  # 0.03 below one threshold: more than this margin
    token = dict(typing, unshared_collapse=rule.min_unshared_collapse - 0.04, collapse_lift=rule.min_collapse_lift)
    assert near(token) and typed_flagged([dict(token, pooled_collapse_lift=1.0, pooled_unshared_collapse=0.9)], rule)
    assert not near(dict(typing, pooled_collapse_lift=None))  # a score not measured is never raised into a flag
    assert near(dict(typing, collapse_lift=math.nan))  # not a number at the screen's precision: typed in float32
    # near the anchor a typed pooled lift needs 0.5, not 0.9: the same margin around that threshold
    low = dict(typing, pooled_collapse_lift=rule.min_typed_pooled_collapse_lift - 0.01)
    assert screened_near(rule, margin=0.05, clean_cos=0.99)(low) and not screened_near(rule, margin=0.05)(low)
    assert not screened_near(rule, margin=0.05, clean_cos=0.8)(low)
    assert typed_flagged([dict(low, pooled_collapse_lift=0.6, pooled_unshared_collapse=0.55)], rule, 0.99)
    assert not typed_flagged([dict(low, pooled_collapse_lift=0.6, pooled_unshared_collapse=0.55)], rule, 0.8)
