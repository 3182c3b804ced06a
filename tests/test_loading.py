"""Safe loading of untrusted checkpoints and a clear error for every kind of bad input."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_amdet import CheckpointError, UnsafeCheckpointError, load_encoder
from lit_amdet.cli import main
from lit_amdet.errors import ConfigError
from tests import sd_files


class _Payload:
    """Unpickling this object opens (and so creates) the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def malicious_checkpoint(tiny_models, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_models["clip_text"], folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    state["payload"] = _Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    assert not marker.exists()
    return folder, marker


def test_pickle_refused_without_opt_in(malicious_checkpoint):
    folder, marker = malicious_checkpoint
    with pytest.raises(UnsafeCheckpointError, match="pickled checkpoint refused"):
        load_encoder(folder)
    assert not marker.exists()


def test_pickle_with_opt_in_still_runs_no_code(malicious_checkpoint):
    folder, marker = malicious_checkpoint
    with pytest.raises(CheckpointError, match="weights_only"):
        load_encoder(folder, allow_pickle=True)
    assert not marker.exists()


def test_benign_pickle_loads_with_opt_in(tiny_models, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["clip_text"], folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        load_encoder(folder)
    adapter = load_encoder(folder, allow_pickle=True)
    ref = load_encoder(tiny_models["clip_text"])
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode_text(["a cat"]), ref.encode_text(["a cat"]))


def _bad_inputs(tiny_models, tmp_path):
    """name -> (path, message fragment) for each kind of broken checkpoint."""
    cases = {"missing": (tmp_path / "does-not-exist", "no such file or folder")}

    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(tiny_models["clip"] / "config.json", empty / "config.json")
    cases["no_weights"] = (empty, "no weights file")

    bare = tmp_path / "bare"
    bare.mkdir()
    cases["not_a_checkpoint"] = (bare, "not a checkpoint folder")

    unknown = tmp_path / "unknown_arch"
    shutil.copytree(tiny_models["clip"], unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2Model"], "gpt2"
    (unknown / "config.json").write_text(json.dumps(cfg))
    cases["unknown_arch"] = (unknown, "unknown architecture 'GPT2Model'")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_models["clip"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (truncated, "corrupt or truncated safetensors")

    nan = tmp_path / "nan"
    shutil.copytree(tiny_models["clip"], nan)
    state = load_file(str(nan / "model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    cases["nan"] = (nan, "NaN or inf")

    vocab = tmp_path / "small_vocab"
    from lit_amdet.tiny import build_hf_clip

    build_hf_clip(vocab, arch="CLIPTextModel")
    cfg = json.loads((vocab / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (vocab / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(vocab / "model.safetensors"))
    k = next(k for k in state if k.endswith("token_embedding.weight"))
    state[k] = state[k][:1000].clone()
    save_file(state, str(vocab / "model.safetensors"), metadata={"format": "pt"})
    cases["vocab_mismatch"] = (vocab, "does not fit the embedding table")

    shape = tmp_path / "wrong_shape"
    shutil.copytree(tiny_models["clip_text"], shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["hidden_size"] = 48
    (shape / "config.json").write_text(json.dumps(cfg))
    cases["wrong_shape"] = (shape, "architecture expects")
    return cases


BAD = ["missing", "no_weights", "not_a_checkpoint", "unknown_arch", "truncated", "nan", "vocab_mismatch",
       "wrong_shape"]


@pytest.fixture
def bad_inputs(tiny_models, tmp_path):
    return _bad_inputs(tiny_models, tmp_path)


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_raises_lit_amdet_error(bad_inputs, case):
    path, fragment = bad_inputs[case]
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_cli_one_line_exit_2(bad_inputs, case, capsys):
    path, fragment = bad_inputs[case]
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--checkpoint", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lit-amdet: error:") and fragment in last


def test_config_with_custom_code_refused(tiny_models, tmp_path):
    folder = tmp_path / "remote_code"
    shutil.copytree(tiny_models["clip_text"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeCheckpointError, match="custom code"):
        load_encoder(folder)


def test_openclip_weights_file_with_model_name(tmp_path):
    """open_clip's other format: a weights file plus a registered architecture name."""
    import open_clip

    from lit_amdet.encoders.openclip import OpenCLIPAdapter
    from lit_amdet.tiny import openclip_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "lit-amdet-tiny.json").write_text(json.dumps(openclip_config()))
    open_clip.add_model_config(tmp_path / "cfg")
    model = open_clip.create_model("lit-amdet-tiny", pretrained=None).eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    adapter = load_encoder(weights, model_name="lit-amdet-tiny")
    assert isinstance(adapter, OpenCLIPAdapter) and adapter.context_length == 77
    with torch.no_grad():
        ids = adapter.tokenize(["a diagram"]).input_ids
        torch.testing.assert_close(adapter.encode(["a diagram"]).pooled, model.encode_text(ids))
    with pytest.raises(CheckpointError, match="for an open_clip weights file give model_name"):
        load_encoder(weights)


def test_transformers4_prefixed_keys_load(tiny_models, tmp_path):
    """transformers 4 saved CLIPTextModel weights as ``text_model.*``; such checkpoints still load."""
    folder = tmp_path / "v4"
    shutil.copytree(tiny_models["clip_text"], folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({f"text_model.{k}": v for k, v in state.items()}, str(folder / "model.safetensors"))
    old, new = load_encoder(folder), load_encoder(tiny_models["clip_text"])
    with torch.no_grad():
        torch.testing.assert_close(old.encode_text(["a red circle"]), new.encode_text(["a red circle"]))


def _built_as_usual(adapter) -> torch.nn.Module:
    """The same architecture constructed the ordinary way, random initialisation and all."""
    model = adapter.model
    if hasattr(model, "config"):
        return type(model)(model.config)
    cfg = dict(adapter.model_cfg)
    return type(model)(**{k: v for k, v in cfg.items() if k != "custom_text"})


@pytest.mark.parametrize("name", ["clip", "siglip", "openclip", "openclip_custom", "bert"])
def test_a_model_built_without_initialisation_holds_the_checkpoint_and_the_usual_buffers(tiny_models, name):
    # Loading skips the random draw of initial weights (every parameter is overwritten from the file); what the
    # file does not hold (position ids, causal masks) must still be what an ordinary construction makes.
    adapter = load_encoder(tiny_models[name])
    weights = next(f for f in tiny_models[name].iterdir() if f.suffix == ".safetensors")
    saved = load_file(str(weights))
    own = adapter.model.state_dict()
    assert all(k in saved or k.endswith("position_ids") for k in own)
    for k, v in own.items():
        if k in saved:
            assert torch.equal(v, saved[k]), k
    usual = dict(_built_as_usual(adapter).named_buffers())
    buffers = dict(adapter.model.named_buffers())
    assert buffers.keys() == usual.keys()
    for k, v in buffers.items():
        if k not in saved:
            assert torch.equal(v, usual[k]), k


def test_a_checkpoint_saved_in_shards_loads_as_the_whole_one(tiny_models, tmp_path):
    """transformers writes a checkpoint above its shard size as ``model-0000i-of-n.safetensors`` and an index
    (the hub's larger CLIP and SigLIP models come that way); until session 2026-12-07 (k) that was refused."""
    sharded = load_encoder(sd_files.sharded(tiny_models["clip"], tmp_path / "sharded"))
    whole = load_encoder(tiny_models["clip"])
    with torch.no_grad():
        torch.testing.assert_close(sharded.encode_text(["a red cube", "two cats"]),
                                   whole.encode_text(["a red cube", "two cats"]), rtol=0, atol=0)


def _damage(folder, case):
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    if case == "index_not_json":
        index_path.write_text('{"weight_map": ')
    elif case == "shard_missing":
        (folder / shards[1]).unlink()
    elif case == "shard_truncated":
        data = (folder / shards[0]).read_bytes()
        (folder / shards[0]).write_bytes(data[: len(data) // 2])
    elif case == "shard_outside":
        outside = folder.parent / "outside.safetensors"
        shutil.move(folder / shards[0], outside)
        index["weight_map"] = {k: "../outside.safetensors" if v == shards[0] else v
                               for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
    elif case == "shard_links_outside":
        outside = folder.parent / "outside.safetensors"
        shutil.move(folder / shards[0], outside)
        (folder / shards[0]).symlink_to(outside)
    elif case == "key_in_another_shard":
        key = next(k for k, v in index["weight_map"].items() if v == shards[0])
        index["weight_map"][key] = shards[1]
        index_path.write_text(json.dumps(index))
    elif case == "key_left_out_of_the_index":
        index["weight_map"].pop(next(iter(index["weight_map"])))
        index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("case, fragment", [
    ("index_not_json", "unreadable shard index"), ("shard_missing", "is missing"),
    ("shard_truncated", "corrupt or truncated safetensors shard"), ("shard_outside", "not a safetensors file name"),
    ("shard_links_outside", "points outside"), ("key_in_another_shard", "does not hold the keys"),
    ("key_left_out_of_the_index", "does not hold the keys")])
def test_a_damaged_or_hostile_shard_index_is_one_line(tiny_models, tmp_path, capsys, case, fragment):
    folder = sd_files.sharded(tiny_models["clip"], tmp_path / "sharded")
    _damage(folder, case)
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--checkpoint", str(folder)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("lit-amdet: error:"), err
    assert fragment in err, err
    # a scan reads the text tower alone, but every shard is checked all the same (a review found a shard of
    # image-tower keys only left unchecked, then read by the report's hash: a FIFO there blocked for ever)
    with pytest.raises(CheckpointError, match=fragment.split(" (")[0]):
        load_encoder(folder, text_only=True)


#: family: (weights file, the image tower's key prefix, how ``text_tower_of`` names the whole model's class)
TOWER_FILES = {"clip": ("model.safetensors", "vision_model.", "{}"),
               "longclip": ("model.safetensors", "vision_model.", "{}"),
               "siglip": ("model.safetensors", "vision_model.", "{}"),
               "openclip": ("open_clip_model.safetensors", "visual.", "open_clip {}"),
               "openclip_custom": ("open_clip_model.safetensors", "visual.", "open_clip {}")}


@pytest.mark.parametrize("name", list(TOWER_FILES))
def test_the_text_tower_alone_encodes_as_the_whole_model_and_its_image_tower_is_never_read(tiny_models, tmp_path,
                                                                                           name):
    """A scan needs the text tower only (`load_encoder`'s ``text_only``): the same outputs, bit for bit, without
    building or reading the image tower (a ViT-L/14 CLIP's is 1.2 GB of its 1.7). Shown by an image tower whose
    weights are NaN, which the whole load refuses; a key of neither tower is still refused. open_clip models
    (session 2026-12-07 (l)) are built whole and their image tower dropped before any tensor is read."""
    weights, image_prefix, tower_of = TOWER_FILES[name]
    whole = load_encoder(tiny_models[name])
    text = load_encoder(tiny_models[name], text_only=True)
    assert text.text_tower_of == tower_of.format(whole.model.__class__.__name__) and not text.has_image_tower
    with torch.no_grad():
        a, b = whole.encode(["a red cube", "two cats on a mat"]), text.encode(["a red cube", "two cats on a mat"])
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.token_features, b.token_features)
    assert text.embed_dim == whole.embed_dim and text.describe()["width"] == whole.describe()["width"]

    broken = shutil.copytree(tiny_models[name], tmp_path / "nan_image_tower")
    state = load_file(str(broken / weights))
    key = next(k for k in state if k.startswith(image_prefix) and k.endswith("weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(broken / weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_encoder(broken)
    with torch.no_grad():
        assert torch.equal(load_encoder(broken, text_only=True).encode(["a red cube", "two cats on a mat"]).pooled,
                           b.pooled)

    save_file({**state, "payload": torch.zeros(2)}, str(broken / weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_encoder(broken, text_only=True)
    if name.startswith("openclip"):  # its config still names the image tower: saved, it would not load again
        with pytest.raises(ConfigError, match="loaded alone"):
            text.save(tmp_path / "saved")
        return

    # transformers before 4.31 saved the position ids as a weight: such a checkpoint loads whole and text-only
    old = shutil.copytree(tiny_models[name], tmp_path / "with_position_ids")
    state = load_file(str(old / weights))
    positions = whole.text.embeddings.position_embedding.weight.shape[0]
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file(state, str(old / weights), metadata={"format": "pt"})
    with torch.no_grad():
        assert torch.equal(load_encoder(old, text_only=True).encode(["a red cube", "two cats on a mat"]).pooled,
                           b.pooled)


def test_a_tokenizer_loads_when_the_process_has_no_stderr_object(tiny_models, monkeypatch):
    """`sys.stderr` is None in a program embedding Python without one; holding file descriptor 2 around the
    tokenizer's construction must not turn that into a refused checkpoint (a review's finding)."""
    import sys

    monkeypatch.setattr(sys, "stderr", None)
    assert load_encoder(tiny_models["clip"]).tokenize(["a red cube"]).input_ids.shape[0] == 1


@pytest.mark.parametrize("case, fragment", [
    ("tokenizer_linked_out", "points outside"), ("config_linked_out", "points outside"),
    ("asks_to_download_a_tower", "asks to download pretrained weights (vision_cfg.timm_model_pretrained)"),
    ("model_cfg_a_list", "no 'model_cfg' mapping"), ("config_not_text", "unreadable config")])
def test_an_open_clip_folder_is_held_to_its_folder_and_never_fetches_anything(tiny_models, tmp_path, capsys, case,
                                                                             fragment):
    """Session 2026-12-07 (k)'s review: an open_clip folder's tokenizer or config linked out of it was read from
    there (a scan went on to `clean`), a config whose vision tower named timm weights to fetch sent the loader to
    the network for a minute, and a broken config ended in "unexpected ..." lines."""
    folder = shutil.copytree(tiny_models["openclip"], tmp_path / "oc")
    config = json.loads((folder / "open_clip_config.json").read_text())
    if case == "tokenizer_linked_out":
        shutil.rmtree(folder / "tokenizer")
        (folder / "tokenizer").symlink_to(tiny_models["clip"])
    elif case == "config_linked_out":
        outside = tmp_path / "outside.json"
        (folder / "open_clip_config.json").rename(outside)
        (folder / "open_clip_config.json").symlink_to(outside)
    elif case == "asks_to_download_a_tower":
        config["model_cfg"]["vision_cfg"] |= {"timm_model_name": "vit_tiny_patch16_224",
                                              "timm_model_pretrained": True}
        (folder / "open_clip_config.json").write_text(json.dumps(config))
    elif case == "model_cfg_a_list":
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": [1]}))
    else:
        (folder / "open_clip_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--checkpoint", str(folder)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("lit-amdet: error:"), err
    assert fragment in err, err


def test_the_recorded_sha256_is_of_the_weights_read_and_follows_no_link_out(tiny_models, tmp_path, capsys):
    """The report's (and `inspect`'s) SHA-256 hashed every weights file under the folder, following a link in a
    subfolder out of it: the hash depended on a file never loaded (session 2026-12-07 (k)'s review). Now it is
    the weights file the load read; for a checkpoint in shards, its index and shards."""
    import hashlib

    folder = shutil.copytree(tiny_models["clip"], tmp_path / "model")
    (folder / "extra").mkdir()
    (folder / "extra" / "x.safetensors").symlink_to(tiny_models["bert"] / "model.safetensors")
    main(["inspect", "--checkpoint", str(folder)])
    out = capsys.readouterr().out
    facts = json.loads(out[out.index("{"):])
    assert facts["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    sharded = sd_files.sharded(tiny_models["clip"], tmp_path / "sharded")
    main(["inspect", "--checkpoint", str(sharded)])
    out = capsys.readouterr().out
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = ["model.safetensors.index.json", *sorted(set(index["weight_map"].values()))]
    assert json.loads(out[out.index("{"):])["sha256"] == hashlib.sha256(
        b"".join((sharded / f).read_bytes() for f in files)).hexdigest()


@pytest.mark.parametrize("text, fragment", [("[1]", "is not a mapping"), ('{"max_seq_length": "long"}',
                                                                          "is not a length")])
def test_a_broken_sentence_transformers_config_is_one_line(tiny_models, tmp_path, text, fragment):
    """``sentence_bert_config.json`` is the untrusted checkpoint's too (session 2026-12-07 (k)'s review: a broken
    one ended in "unexpected JSONDecodeError" or "TypeError")."""
    folder = shutil.copytree(tiny_models["bert"], tmp_path / "bert")
    (folder / "sentence_bert_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=fragment):
        load_encoder(folder)


def test_a_bert_saved_without_its_pooler_loads_and_scans_against_one_with_it(tiny_models, tmp_path):
    """Found by a held-out red team (session 2026-12-07 (l)): a sentence encoder fine-tuned as
    ``BertModel(add_pooling_layer=False)`` and saved has no ``pooler.`` weights, and was refused as "2 weights
    missing", though mean pooling never reads them. It now loads as that architecture, encodes as the model with
    its pooler does, and counts as the same architecture as an anchor that has one."""
    from lit_amdet.encoders.loading import check_same_architecture

    folder = shutil.copytree(tiny_models["bert"], tmp_path / "no_pooler")
    state = load_file(str(folder / "model.safetensors"))
    assert any(k.startswith("pooler.") for k in state)
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with_pooler, without = load_encoder(tiny_models["bert"]), load_encoder(folder)
    assert without.model.pooler is None and without.unused_parameter_names() == []
    with torch.no_grad():
        a, b = with_pooler.encode(["a red cube", "two cats"]), without.encode(["a red cube", "two cats"])
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.token_features, b.token_features)
    check_same_architecture(without, with_pooler)
    check_same_architecture(with_pooler, without)
    save_file({**{k: v for k, v in state.items() if not k.startswith("pooler.")},
               "encoder.layer.0.output.dense.weight": state["pooler.dense.weight"][:, :1].contiguous()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shape"):  # the other keys are held to the architecture as before
        load_encoder(folder)
