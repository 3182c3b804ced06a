"""`lit-amdet detect` end to end on tiny models: run folder, exit codes, every family, bad input, DDP and bf16.

These are plumbing tests (random-init encoders say nothing about detection);
the real backdoored-vs-benign scan on the pretrained MiniLM is in test_demo.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lit_amdet.cli import main
from tests.conftest import TINY_MODELS

CONFIG = str(Path(__file__).parent / "configs" / "detect_tiny.yaml")


def detect(tmp_path, suspect, *extra: str, out_name: str = "run") -> tuple[int, Path]:
    out = tmp_path / out_name
    args = ["detect", "--config", CONFIG, "--model.init_args.suspect", str(suspect),
            "--model.init_args.output_dir", str(out), "--trainer.default_root_dir", str(tmp_path), *extra]
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out


def test_clean_scan_writes_a_complete_run_folder(tiny_models, tmp_path, capsys):
    code, out = detect(tmp_path, tiny_models["clip"], "--model.init_args.anchor", str(tiny_models["clip"]),
                       "--model.init_args.name", "tiny-clip")
    lines = capsys.readouterr().out.strip().splitlines()
    # the suspect is its own anchor: nothing it does under any trigger differs from the clean model
    assert code == 0 and lines[-1] == "tiny-clip: clean"
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "clean" and report["anchor_used"] is True
    assert report["scores"]["assimilation_gap"] == pytest.approx(0.0, abs=1e-5)
    for check in report["checks"]:
        assert {"name", "value", "threshold", "op", "passed"} <= set(check)
    assert len(report["suspect"]["sha256"]) == 64 and report["seed"] == 0 and report["seconds"] > 0
    assert report["landscape"]["grid"] == 5 and len(report["hessian"]["top"]) == 1
    assert len(report["nearest_tokens"]) == 1 and len(report["nearest_tokens"][0]) == 3
    assert report["nearest_captions"] and report["restarts"] == 2 and len(report["restart_losses"]) == 2
    for name in ("landscape.png", "hessian.png"):
        assert (out / name).stat().st_size > 1000
    trig = load_file(str(out / "trigger.safetensors"))
    assert trig["trigger"].shape == (1, report["suspect"]["width"]) and trig["all_restarts"].shape[0] == 2
    # diffusers' load_textual_inversion format: exactly one {token: [k, W]} entry
    ti = load_file(str(out / "learned_embeds.safetensors"))
    assert list(ti) == ["<amdet-trigger>"] and ti["<amdet-trigger>"].shape == trig["trigger"].shape
    assert not list(tmp_path.glob(".detect-*"))  # no staging leftovers


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_every_family_scans_without_an_anchor(tiny_models, tmp_path, family):
    code, out = detect(tmp_path, tiny_models[family], "--trainer.max_steps", "2", "--trainer.callbacks", "[]",
                       "--model.init_args.evidence_callbacks", "false", "--always_exit_zero", "true")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["anchor_used"] is False and report["notes"] and report["scores"]["anchor_cos"] is None
    assert report["verdict"] in ("clean", "BACKDOORED")
    assert [c["name"] for c in report["checks"]] == ["assimilation_lift", "same_target_ratio"]
    assert report["landscape"] is None and not (out / "landscape.png").exists()


def test_exit_code_one_for_a_backdoored_verdict_unless_told_otherwise(tiny_models, tmp_path, capsys):
    # a rule that flags everything exercises the BACKDOORED path (thresholds are configuration)
    rule = ["--model.init_args.rule", "lit_amdet.decision.ContrastRule",
            "--model.init_args.rule.init_args.no_anchor_min_lift", "-10",
            "--model.init_args.rule.init_args.no_anchor_min_same_target", "-1",
            "--trainer.callbacks", "[]", "--model.init_args.evidence_callbacks", "false",
            "--trainer.max_steps", "2", "--model.init_args.name", "m"]
    code, out = detect(tmp_path, tiny_models["siglip"], *rule)
    assert code == 1 and capsys.readouterr().out.strip().splitlines()[-1] == "m: BACKDOORED"
    assert json.loads((out / "report.json").read_text())["backdoored"] is True
    code, _ = detect(tmp_path, tiny_models["siglip"], *rule, "--always_exit_zero", "true", out_name="again")
    assert code == 0


def test_reference_rule_is_selectable(tiny_models, tmp_path):
    code, out = detect(tmp_path, tiny_models["openclip"], "--model.init_args.anchor", str(tiny_models["openclip"]),
                       "--model.init_args.rule", "lit_amdet.decision.ReferenceRule")
    report = json.loads((out / "report.json").read_text())
    assert report["rule"]["class"] == "ReferenceRule"
    assert "landscape_positive_ratio" in {c["name"] for c in report["checks"]}
    assert code == (1 if report["backdoored"] else 0)


@pytest.mark.parametrize("case", ["other_architecture", "missing_suspect", "empty_prompts", "nan_weights"])
def test_bad_input_is_one_line_and_leaves_no_output(tiny_models, tmp_path, capsys, case):
    suspect, extra = tiny_models["clip"], []
    if case == "other_architecture":
        extra = ["--model.init_args.anchor", str(tiny_models["bert"])]
    elif case == "missing_suspect":
        suspect = tmp_path / "nowhere"
    elif case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n\n")
        extra = ["--data.init_args.source", str(tmp_path / "empty.txt")]
    else:
        import shutil

        import torch
        from safetensors.torch import load_file as load
        from safetensors.torch import save_file

        suspect = tmp_path / "nan_model"
        shutil.copytree(tiny_models["clip"], suspect)
        state = load(str(suspect / "model.safetensors"))
        first = next(iter(state))
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, str(suspect / "model.safetensors"))
    code, out = detect(tmp_path, suspect, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lit-amdet: error:")
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()
    if case == "other_architecture":
        assert "anchor" in err[-1]


def _subprocess_scan(tiny_models, tmp_path, name, *extra) -> dict:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "lit_amdet", "detect", "--config", CONFIG,
           "--model.init_args.suspect", str(tiny_models["clip"]), "--model.init_args.anchor",
           str(tiny_models["clip"]), "--model.init_args.output_dir", str(out),
           "--trainer.default_root_dir", str(tmp_path), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].endswith(": clean")
    assert res.stdout.count(": clean") == 1  # one verdict, from process 0
    return json.loads((out / "report.json").read_text())


def test_ddp_two_processes_on_cpu(tiny_models, tmp_path):
    report = _subprocess_scan(tiny_models, tmp_path, "ddp", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert report["world_size"] == 2
    assert report["scores"]["prompts"] == 8  # the held-out shards were summed over both processes
    assert not list(tmp_path.glob(".detect-*"))


def test_bf16_mixed_on_cpu(tiny_models, tmp_path):
    report = _subprocess_scan(tiny_models, tmp_path, "bf16", "--trainer.precision", "bf16-mixed")
    assert report["precision"] == "bf16-mixed" and report["verdict"] == "clean"
