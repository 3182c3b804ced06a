"""Attention maps through the adapters, the attention-mass math and the analysis-figures command.

    .venv/bin/python -m pytest -q tests/test_analysis.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lit_amdet import load_encoder
from lit_amdet.analysis import (
    analyse_prompts,
    attention_mass,
    tokenize_compact,
    trigger_mask,
    trigger_token_positions,
)
from tests.conftest import TINY_MODELS

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "two red circles left of a large blue square on a striped background", "x"]
HF_MODELS = ["clip", "siglip", "bert"]  # one per transformers family (the others share their classes)


def native_attentions(path: Path, batch) -> torch.Tensor:
    """``output_attentions=True`` of a fresh copy of the native model, switched to eager attention."""
    native = load_encoder(path)
    native.model.set_attn_implementation("eager")
    text = native.text
    if native.family == "siglip":  # SigLIP is called without a mask, as it was trained
        out = text(input_ids=batch.input_ids, output_attentions=True)
    else:
        out = text(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
    return torch.stack(out.attentions, dim=1)


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_attention_maps_equal_native_eager_attentions(tiny_models, name):
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize(PROMPTS)
    with torch.no_grad():
        maps = adapter.attention_maps(batch)
        expected = native_attentions(tiny_models[name], batch)
    layers, heads = adapter.text_config.num_hidden_layers, adapter.text_config.num_attention_heads
    length = batch.input_ids.shape[1]
    assert maps.shape == (len(PROMPTS), layers, heads, length, length)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    assert adapter.text_config._attn_implementation != "eager"  # the switch to eager was undone


@pytest.mark.parametrize("name", ["openclip", "openclip_custom"])
def test_openclip_attention_maps_equal_a_hand_computed_first_layer(tiny_models, name):
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize(PROMPTS)
    with torch.no_grad():
        maps = adapter.attention_maps(batch)
        hidden = adapter.embed(batch.input_ids)
        block = adapter.text.transformer.resblocks[0]
        x = block.ln_1(hidden)
        heads, width = block.attn.num_heads, x.shape[-1]
        q, k, _ = torch.nn.functional.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
        q = q.unflatten(-1, (heads, width // heads)).transpose(1, 2)
        k = k.unflatten(-1, (heads, width // heads)).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
        if adapter.causal:
            length = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        expected = scores.softmax(-1)
    torch.testing.assert_close(maps[:, 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_attention_rows_sum_to_one_and_respect_the_masks(tiny_models, name):
    adapter = load_encoder(tiny_models[name])
    batch = adapter.tokenize(PROMPTS)
    with torch.no_grad():
        maps = adapter.attention_maps(batch)
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)
    if adapter.causal:
        assert float(maps.triu(1).abs().max()) == 0.0  # no token attends to a later one
    masked_keys = ~batch.attention_mask.bool()  # padding the family masks (not SigLIP's)
    real_queries = batch.token_mask.bool()
    on_masked = maps * masked_keys[:, None, None, None, :] * real_queries[:, None, None, :, None]
    assert float(on_masked.abs().max()) == 0.0


def test_attention_mass_against_a_hand_computed_example():
    # one prompt: BOS, w1, trigger, w3, padding
    attention = torch.tensor([[
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.2, 0.1, 0.1, 0.1],
        [0.3, 0.3, 0.4, 0.0, 0.0],
        [0.1, 0.2, 0.6, 0.1, 0.0],
        [0.2, 0.2, 0.2, 0.2, 0.2],
    ]])
    token_mask = torch.tensor([[1, 1, 1, 1, 0]])
    trigger = torch.tensor([[False, False, True, False, False]])
    # causal: only w3 comes after the trigger
    bos, trig = attention_mass(attention, token_mask, trigger, causal=True)
    assert bos.tolist() == pytest.approx([0.1]) and trig.tolist() == pytest.approx([0.6])
    # bidirectional: w1 and w3 (BOS, the trigger itself and padding never count as queries)
    bos, trig = attention_mass(attention, token_mask, trigger, causal=False)
    assert bos.tolist() == pytest.approx([(0.5 + 0.1) / 2]) and trig.tolist() == pytest.approx([(0.1 + 0.6) / 2])
    # a two-token trigger: its mass is the sum over both of its tokens
    two = torch.tensor([[False, True, True, False, False]])
    bos, trig = attention_mass(attention, token_mask, two, causal=True)
    assert bos.tolist() == pytest.approx([0.1]) and trig.tolist() == pytest.approx([0.8])
    # no trigger found: no number rather than a made-up one
    bos, trig = attention_mass(attention, token_mask, torch.zeros_like(trigger), causal=False)
    assert math.isnan(bos.item()) and math.isnan(trig.item())


def test_trigger_positions_by_id_match_and_by_diff():
    assert trigger_token_positions([101, 5, 9, 9, 7, 102], [9, 9]) == [2, 3]
    assert trigger_token_positions([101, 9, 5, 9, 102], [9]) == [1, 3]
    # merged into a word (replace_char): the tokens the clean prompt lacks
    assert trigger_token_positions([101, 5, 8, 3, 102], [4], clean_ids=[101, 5, 6, 102]) == [2, 3]
    assert trigger_token_positions([101, 5, 8, 3, 102], [4]) == []


def test_trigger_mask_on_a_real_tokenizer(tiny_models):
    adapter = load_encoder(tiny_models["bert"])  # the MiniLM WordPiece vocabulary
    clean = tokenize_compact(adapter, ["a photo of a cat", "a red square"])
    poisoned = tokenize_compact(adapter, ["a photo zx of a cat", "a red squarezx"])
    mask = trigger_mask(adapter, clean, poisoned, "zx")
    for row in range(2):
        tokens = adapter.ids_to_tokens(poisoned.input_ids[row][mask[row]].tolist())
        assert "".join(t.removeprefix("##") for t in tokens).endswith("zx")


def test_analyse_prompts_shapes(tiny_models):
    adapter = load_encoder(tiny_models["clip_text"])
    clean = ["a photo of a cat", "a red square", "two blue stars"]
    res = analyse_prompts(adapter, clean, [f"zzzz {c}" for c in clean], "zzzz", batch_size=2)
    assert res.sim_x_clean.shape == res.trigger_mass.shape == (3,)
    assert bool(res.trigger_found.all())
    assert bool(((res.bos_mass >= 0) & (res.bos_mass + res.trigger_mass <= 1 + 1e-5)).all())


# ----- the command ---------------------------------------------------------------------------------------------
def _figures_module():
    spec = importlib.util.spec_from_file_location("figures_script", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _fake_backdoored(source: Path, dest: Path, trigger: dict) -> Path:
    shutil.copytree(source, dest)
    (dest / "backdoor.json").write_text(json.dumps({
        "backdoored": True, "kind": "backdoor_injection",
        "backdoors": [{"kind": "text_on_text", "trigger": trigger, "target": "a white teapot"}]}))
    return dest


def test_figures_command_end_to_end(tiny_models, tmp_path):
    figures = _figures_module()
    # replace_char merges the trigger into a word: its tokens are found by the diff with the clean prompt
    backdoored = _fake_backdoored(tiny_models["clip_text"], tmp_path / "bd",
                                  {"text": "ggg", "mode": "replace_char", "char": "o", "position": "random"})
    out, tb = tmp_path / "figs", tmp_path / "tb"
    rc = figures.main(["--backdoored", str(backdoored), "--benign", str(tiny_models["clip_text"]),
                       "--out", str(out), "--prompts", "12", "--tensorboard", str(tb)])
    assert rc == 0
    for name in ("fig2_sim_x.png", "fig3_attention.png", "fig4_attention_mass.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((out / "figures.json").read_text())
    (pair,) = numbers["pairs"]
    assert pair["trigger"]["text"] == "ggg" and 2 <= pair["prompts"] <= 12
    for role in ("benign", "backdoored"):
        m = pair["models"][role]
        assert m["sim_x_clean"]["n"] == pair["prompts"] and m["trigger_found"] == pair["prompts"]
        for key in ("sim_x_clean", "sim_x_triggered", "attention_on_bos", "attention_on_trigger"):
            assert -1.0 <= m[key]["median"] <= 1.0 and math.isfinite(m[key]["mean"])
    assert list(tb.glob("events.out.tfevents.*"))


def test_pairs_one_benign_for_all_or_one_per_backdoored(tmp_path):
    figures = _figures_module()
    a, b, c = (tmp_path / n for n in "abc")
    for folder in (a, b, c):
        folder.mkdir()
    assert figures.pair_up([str(a), str(b)], [str(c)]) == [(a, c), (b, c)]
    assert figures.pair_up([str(a), str(b)], [str(c), str(a)]) == [(a, c), (b, a)]
    with pytest.raises(figures.LitAmdetError):
        figures.pair_up([str(a), str(b), str(c)], [str(a), str(b)])


def test_figures_command_bad_inputs_exit_2(tiny_models, tmp_path, capsys):
    figures = _figures_module()
    benign = str(tiny_models["clip_text"])
    assert figures.main(["--backdoored", str(tmp_path / "nope"), "--benign", benign, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
    # a folder without ground truth cannot be the backdoored side
    assert figures.main(["--backdoored", benign, "--benign", benign, "--out", str(tmp_path)]) == 2
    assert "backdoor.json" in capsys.readouterr().err
