"""Pipelines and single-file Stable Diffusion checkpoints: the text encoder we extract computes what the
original model computes (atol 1e-5), under the container's name, reading nothing else of the file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lit_amdet import CheckpointError, load_encoder
from lit_amdet.benchmark.scan import PeakMemory
from lit_amdet.encoders import text_encoder_components
from tests import sd_files

PROMPTS = ["a photo of a cat", "two red circles left of a large blue square", "x"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_parts")
    return {"clip": sd_files.clip_text(root / "clip_text"),
            "clip_2": sd_files.clip_text(root / "clip_text_2", seed=3),
            "open_clip": sd_files.open_clip_model()}


def _same(a, b):
    out_a, out_b = a.encode(PROMPTS), b.encode(PROMPTS)
    assert torch.allclose(out_a.token_features, out_b.token_features, atol=1e-5)
    assert torch.allclose(out_a.pooled, out_b.pooled, atol=1e-5)


@torch.no_grad()
def test_sd1_single_file_is_the_clip_text_model(parts, tmp_path):
    file = sd_files.sd1_file(tmp_path / "dreamshaper_8.safetensors", parts["clip"])
    adapter = load_encoder(file)
    assert adapter.name == "dreamshaper_8" and adapter.component == "text_encoder"
    assert text_encoder_components(file) == ["text_encoder"]
    _same(adapter, load_encoder(parts["clip"]))


@torch.no_grad()
def test_sd2_single_file_is_open_clip_at_the_penultimate_block(parts, tmp_path):
    model = parts["open_clip"]
    adapter = load_encoder(sd_files.sd2_file(tmp_path / "sd21.safetensors", model))
    assert adapter.model.config.num_hidden_layers == len(model.transformer.resblocks) - 1
    assert adapter.tokenizer.pad_token == "!"
    ids = adapter.tokenize(PROMPTS).input_ids
    # SD 2's conditioning, computed with open_clip's own modules: every block but the last, then ln_final
    x = model.token_embedding(ids) + model.positional_embedding[: ids.shape[1]]
    mask = model.attn_mask[: ids.shape[1], : ids.shape[1]]
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=mask)
    expected = model.ln_final(x)
    got = adapter.encode(PROMPTS).token_features
    real = ids != 0  # open_clip attends to its "!" padding; compare the prompt tokens
    assert torch.allclose(got[real], expected[real], atol=1e-5)


@torch.no_grad()
def test_sdxl_single_file_holds_two_encoders(parts, tmp_path):
    model = parts["open_clip"]
    file = sd_files.sdxl_file(tmp_path / "juggernaut_xl.safetensors", parts["clip"], model)
    assert text_encoder_components(file) == ["text_encoder", "text_encoder_2"]
    with pytest.raises(CheckpointError, match="holds 2 text encoders"):
        load_encoder(file)
    first = load_encoder(file, component="text_encoder")
    assert first.name == "juggernaut_xl.text_encoder"
    _same(first, load_encoder(parts["clip"]))
    second = load_encoder(file, component="text_encoder_2")
    assert second.name == "juggernaut_xl.text_encoder_2"
    assert type(second.model).__name__ == "CLIPTextModelWithProjection"
    ids = second.tokenize(PROMPTS).input_ids
    expected = model.encode_text(ids)  # open_clip's pooled, projected embedding (bigG: every block)
    assert torch.allclose(second.encode(PROMPTS).pooled, expected, atol=1e-5)
    with pytest.raises(CheckpointError, match="no text encoder 'text_encoder_3'"):
        load_encoder(file, component="text_encoder_3")


@torch.no_grad()
def test_pipeline_folder_loads_its_text_encoder_with_the_sibling_tokenizer(parts, tmp_path):
    folder = sd_files.pipeline(tmp_path / "my-sd15-finetune", {"text_encoder": parts["clip"]})
    assert not (folder / "text_encoder" / "tokenizer.json").exists()
    adapter = load_encoder(folder)
    assert adapter.name == "my-sd15-finetune" and adapter.component == "text_encoder"
    assert adapter.source_path == folder / "text_encoder" / "model.safetensors"  # the weights read
    _same(adapter, load_encoder(parts["clip"]))


@torch.no_grad()
def test_sdxl_pipeline_has_two_encoders_each_its_own(parts, tmp_path):
    folder = sd_files.pipeline(tmp_path / "sdxl-ft", {"text_encoder": parts["clip"], "text_encoder_2": parts["clip_2"]})
    assert text_encoder_components(folder) == ["text_encoder", "text_encoder_2"]
    second = load_encoder(folder, component="text_encoder_2")
    assert second.name == "sdxl-ft.text_encoder_2"
    _same(second, load_encoder(parts["clip_2"]))
    first = load_encoder(folder, component="text_encoder")
    assert not torch.allclose(first.encode(PROMPTS).pooled, second.encode(PROMPTS).pooled)


def test_single_file_reads_only_the_text_encoder(parts, tmp_path):
    """A file padded with a 512 MiB UNet stand-in costs the text encoder's memory, not the file's."""
    file = sd_files.sd1_file(tmp_path / "big.safetensors", parts["clip"], pad_mib=512)
    assert file.stat().st_size > 512 * 2**20
    with PeakMemory() as peak:
        adapter = load_encoder(file)
    assert adapter.component == "text_encoder"
    grew = peak.result()["rss_increase_mib"]
    assert grew < 128, f"loading grew the process by {grew:.0f} MiB for a 512 MiB file"


def test_plain_checkpoint_has_no_components(parts):
    assert text_encoder_components(parts["clip"]) == []
    with pytest.raises(CheckpointError, match="no 'text_encoder'"):
        load_encoder(parts["clip"], component="text_encoder")


def test_pipeline_index_naming_another_class_is_refused(parts, tmp_path):
    folder = sd_files.pipeline(tmp_path / "evil", {"text_encoder": parts["clip"]})
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["evil_module", "RemoteCodeModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="only transformers CLIPTextModel"):
        load_encoder(folder)


@pytest.mark.parametrize("kind", ["transformers", "in_shards", "open_clip", "pipeline"])
def test_hf_cache_stand_in_and_offline_error(parts, tmp_path, monkeypatch, kind):
    """A hub id resolves from the local hub cache (its layout: refs/main, snapshots/<commit>, blobs) and records
    the commit; an id that is not cached, offline, is one line naming it. The snapshot's files are links into
    blobs/, out of the snapshot's folder but inside the repository's, for every kind of checkpoint: a transformers
    folder, one in shards, an open_clip folder and a pipeline (the last two were refused as "points outside" until
    session 2026-12-07 (k)'s review)."""
    from lit_amdet.tiny import build_openclip

    source = {"transformers": lambda: parts["clip"],
              "in_shards": lambda: sd_files.sharded(parts["clip"], tmp_path / "sharded"),
              "open_clip": lambda: build_openclip(tmp_path / "oc"),
              "pipeline": lambda: sd_files.pipeline(tmp_path / "pipe", {"text_encoder": parts["clip"]})}[kind]()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in source.rglob("*"):  # the hub cache's own form: snapshot files are links into blobs/
        if f.is_file():
            blob = blobs / f"{len(list(blobs.iterdir()))}-{f.name}"
            blob.write_bytes(f.read_bytes())
            (snap / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(source)).symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    adapter = load_encoder("someone/tiny-clip")
    assert adapter.name == "someone/tiny-clip"
    assert adapter.origin == {"hub_id": "someone/tiny-clip", "revision": commit, "requested": None}
    _same(adapter, load_encoder(source))
    with pytest.raises(CheckpointError, match="someone/not-cached is not in the local hub cache"):
        load_encoder("someone/not-cached")


def test_pooled_projection_shapes_are_read_from_the_weights(parts, tmp_path):
    model = parts["open_clip"]
    second = load_encoder(sd_files.sdxl_file(tmp_path / "x.safetensors", parts["clip"], model),
                          component="text_encoder_2")
    assert second.embed_dim == model.text_projection.shape[1]
    assert F.cosine_similarity(second.encode_text(PROMPTS), model.encode_text(
        second.tokenize(PROMPTS).input_ids), dim=-1).min() > 0.9999
