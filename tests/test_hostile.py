"""Hostile and broken inputs through the new ways in (pipeline folders, single files): every one ends the
command in one line and exit code 2, writes nothing, runs no code and reads nothing outside the given path."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_amdet.cli import main
from lit_amdet.resources import config_path
from tests import sd_files
from tests.test_loading import _Payload


def _raw_safetensors(path, header: dict, data: bytes, header_len: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


def _sd1_state(clip_dir):
    return {"cond_stage_model.transformer." + ("text_model." + k if not k.startswith("text_model.") else k): v
            for k, v in load_file(str(clip_dir / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> (path, fragment of the one-line error, marker file a payload would create or None)."""
    root = tmp_path_factory.mktemp("hostile")
    clip = sd_files.clip_text(root / "clip_text")
    cases = {}

    zero = root / "zero.safetensors"
    zero.write_bytes(b"")
    cases["zero_byte_file"] = (zero, "corrupt or truncated", None)

    good = sd_files.sd1_file(root / "good.safetensors", clip)
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    cases["truncated_file"] = (root / "truncated.safetensors", "corrupt or truncated", None)

    cases["header_length_lies"] = (_raw_safetensors(root / "len.safetensors", {"a": {
        "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, header_len=1 << 40), "corrupt", None)
    cases["offsets_past_the_end"] = (_raw_safetensors(root / "offsets.safetensors", {
        "cond_stage_model.model.token_embedding.weight": {"dtype": "F32", "shape": [4, 64],
                                                          "data_offsets": [0, 1 << 20]}}, b"\0" * 64), "corrupt", None)
    cases["overlapping_tensors"] = (_raw_safetensors(root / "overlap.safetensors", {
        "cond_stage_model.model.token_embedding.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "cond_stage_model.model.positional_embedding": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
    }, b"\0" * 24), "corrupt", None)

    state = _sd1_state(clip)
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    wrong_dtype = dict(state)
    wrong_dtype[key] = torch.zeros(state[key].shape, dtype=torch.int64)
    save_file(wrong_dtype, str(root / "int_weights.safetensors"))
    cases["integer_weights"] = (root / "int_weights.safetensors", "not floating point", None)

    wrong_shape = dict(state)
    fc = next(k for k in state if k.endswith("layers.0.mlp.fc2.weight"))
    wrong_shape[fc] = torch.zeros(3, 3)
    save_file(wrong_shape, str(root / "shape.safetensors"))
    cases["wrong_shape"] = (root / "shape.safetensors", "architecture expects", None)

    nan = dict(state)
    nan[key] = state[key].clone()
    nan[key][0, 0] = float("nan")
    save_file(nan, str(root / "nan.safetensors"))
    cases["nan_weights"] = (root / "nan.safetensors", "NaN or inf", None)

    save_file({"model.diffusion_model.x": torch.zeros(2), "encoder.weight": torch.zeros(2)},
              str(root / "unknown.safetensors"))
    cases["no_known_layout"] = (root / "unknown.safetensors", "no text encoder in a known single-file layout", None)

    marker = root / "pwned"
    torch.save({**state, "payload": _Payload(marker)}, root / "evil.ckpt")
    cases["pickle_payload"] = (root / "evil.ckpt", "pickled checkpoint refused", marker)

    outside = root / "outside_secret.safetensors"
    shutil.copy(clip / "model.safetensors", outside)
    link = sd_files.pipeline(root / "link_pipe", {"text_encoder": clip})
    (link / "text_encoder" / "model.safetensors").unlink()
    (link / "text_encoder" / "model.safetensors").symlink_to(outside)
    cases["symlink_out_of_folder"] = (link, "points outside", None)

    evil = sd_files.pipeline(root / "evil_pipe", {"text_encoder": clip})
    index = json.loads((evil / "model_index.json").read_text())
    index["text_encoder"] = ["my_package", "RemoteCodeModel"]
    (evil / "model_index.json").write_text(json.dumps(index))
    cases["pipeline_class_not_allowed"] = (evil, "only transformers CLIPTextModel", None)

    traversal = sd_files.pipeline(root / "traversal_pipe", {"text_encoder": clip})
    index = json.loads((traversal / "model_index.json").read_text())
    index["text_encoder/../../clip_text"] = ["transformers", "CLIPTextModel"]
    (traversal / "model_index.json").write_text(json.dumps(index))
    cases["pipeline_path_traversal"] = (traversal, "not a plain folder name", None)

    linked = sd_files.pipeline(root / "linked_pipe", {"text_encoder": clip})
    shutil.rmtree(linked / "text_encoder")
    (linked / "text_encoder").symlink_to(clip)
    cases["pipeline_folder_is_a_link_out"] = (linked, "points outside", None)

    garbage = sd_files.pipeline(root / "garbage_pipe", {"text_encoder": clip})
    (garbage / "model_index.json").write_text("[1, 2")
    cases["pipeline_index_not_json"] = (garbage, "unreadable", None)

    missing = sd_files.pipeline(root / "missing_pipe", {"text_encoder": clip})
    shutil.rmtree(missing / "text_encoder")
    cases["pipeline_folder_missing"] = (missing, "no text_encoder/ folder", None)
    def config_case(name: str, text: str, fragment: str) -> None:
        folder = shutil.copytree(clip, root / name)
        (folder / "config.json").write_text(text)
        cases[name] = (folder, fragment, None)

    config = json.loads((clip / "config.json").read_text())
    config_case("config_a_list", "[1, 2]", "config is not a mapping")
    config_case("architectures_nested", json.dumps(config | {"architectures": [["CLIPTextModel"]]}),
                "unknown architecture")
    config_case("activation_names_no_function", json.dumps(config | {"hidden_act": "os.system"}),
                "its config does not build a model")
    config_case("fifty_thousand_layers", json.dumps(config | {"num_hidden_layers": 50000}),
                "asks for 50000 layers")
    preprocessor = shutil.copytree(clip, root / "preprocessor_config_broken")
    (preprocessor / "preprocessor_config.json").write_text("{oops")
    cases["preprocessor_config_broken"] = (preprocessor, "unreadable config", None)
    binary = shutil.copytree(clip, root / "config_not_text")
    (binary / "config.json").write_bytes(b"\xff\xfe\x00{")
    cases["config_not_text"] = (binary, "unreadable config", None)

    merges = shutil.copytree(clip, root / "merges_unfit")  # the Rust tokenizer panics on these
    (merges / "tokenizer.json").unlink()
    (merges / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (merges / "merges.txt").write_text("#version\na b\n")
    cases["tokenizer_merges_unfit"] = (merges, "tokenizer files present but unreadable", None)
    sparse = shutil.copytree(clip, root / "ids_past_the_table")
    tokenizer = json.loads((sparse / "tokenizer.json").read_text())
    for i, token in enumerate(["a</w>", "the</w>", "of</w>", "on</w>", "in</w>"]):
        tokenizer["model"]["vocab"][token] = 60000 + i
    (sparse / "tokenizer.json").write_text(json.dumps(tokenizer))
    cases["token_ids_past_the_table"] = (sparse, "does not fit the embedding table", None)

    width0 = dict(state)
    width0[key] = torch.zeros(state[key].shape[0], 0)
    save_file(width0, str(root / "width0.safetensors"))
    cases["single_file_width_0"] = (root / "width0.safetensors", "do not describe a text encoder", None)

    huge = shutil.copytree(clip, root / "huge")  # 64 GiB a matrix: the allocator refuses it
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps(config | {"hidden_size": 65536, "intermediate_size": 262144,
                                                           "num_hidden_layers": 2, "num_attention_heads": 64}))
    cases["config_too_large"] = (huge, "its config does not build a model", None)
    return cases, clip


@pytest.mark.parametrize("case", ["zero_byte_file", "truncated_file", "header_length_lies", "offsets_past_the_end",
                                  "overlapping_tensors", "integer_weights", "wrong_shape", "nan_weights",
                                  "no_known_layout", "pickle_payload", "symlink_out_of_folder",
                                  "pipeline_class_not_allowed", "pipeline_path_traversal",
                                  "pipeline_folder_is_a_link_out", "pipeline_index_not_json",
                                  "pipeline_folder_missing", "config_too_large", "config_a_list",
                                  "architectures_nested", "activation_names_no_function", "fifty_thousand_layers",
                                  "config_not_text", "tokenizer_merges_unfit", "token_ids_past_the_table",
                                  "single_file_width_0", "preprocessor_config_broken"])
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(corpus, case, tmp_path, capfd, monkeypatch):
    """Each ends in one line on stderr, file descriptor 2 included (native code writes there itself: the Rust
    tokenizer's panic message). The last ten cases are session 2026-12-07 (k)'s, nine of them found by its
    review: each ended in an "unexpected ..." line, a Rust panic and a Python traceback with exit 1, or (50,000
    layers) 67 s and 4.4 GB of building before its error."""
    cases, clip = corpus
    path, fragment, marker = cases[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        main(["detect", "--config", str(config_path("scan.yaml")), "--model.init_args.suspect", str(path),
              "--model.init_args.anchor", str(clip), "--trainer.default_root_dir", str(out),
              "--trainer.logger", "false"])
    err = capfd.readouterr().err.strip()
    assert info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("lit-amdet: error:"), err
    assert fragment in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    if marker is not None:
        assert not marker.exists()
