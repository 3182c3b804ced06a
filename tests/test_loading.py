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
