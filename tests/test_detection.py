"""`lit-amdet detect` end to end on tiny models: run folder, exit codes, every family, bad input, DDP and bf16.

The tiny-model tests are plumbing (random-init encoders say nothing about detection);
the real backdoored-vs-benign scans of the pretrained MiniLM are in test_detection_minilm.py (and larger in
test_demo.py).
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
    # a whole CLIPModel: the scan builds and reads its text tower alone, and says so
    assert report["suspect"]["text_tower_of"] == "CLIPModel" and report["suspect"]["has_image_tower"] is False
    assert report["landscape"]["grid"] == 5 and len(report["hessian"]["top"]) == 1
    assert len(report["nearest_tokens"]) == 1 and len(report["nearest_tokens"][0]) == 3
    # two searched restarts and the swapped one (the token path's yardstick), taken out at the start: a model
    # at its anchor is judged without it
    assert report["nearest_captions"] and report["restarts"] == 2 and len(report["restart_losses"]) == 3
    swapped = report["restart_scores"][2]
    assert swapped["objective"] == "amdet_swapped" and swapped["dropped_at_step"] == 0 and report["best_restart"] < 2
    for name in ("landscape.png", "hessian.png"):
        assert (out / name).stat().st_size > 1000
    trig = load_file(str(out / "trigger.safetensors"))
    assert trig["trigger"].shape == (1, report["suspect"]["width"]) and trig["all_restarts"].shape[0] == 3
    # diffusers' load_textual_inversion format: exactly one {token: [k, W]} entry
    ti = load_file(str(out / "learned_embeds.safetensors"))
    assert list(ti) == ["<amdet-trigger>"] and ti["<amdet-trigger>"].shape == trig["trigger"].shape
    assert not list(tmp_path.glob(".detect-*"))  # no staging leftovers


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_every_family_scans_without_an_anchor_and_never_accuses(tiny_models, tmp_path, family):
    """Without an anchor a collapsing trigger may be a natural backdoor, and finding none clears nothing (the
    no-anchor scan missed every working backdoor of the world zoos): the verdict is inconclusive (exit 3) either
    way, never BACKDOORED and never clean."""
    code, out = detect(tmp_path, tiny_models[family], "--trainer.max_steps", "2", "--trainer.callbacks", "[]",
                       "--model.init_args.evidence_callbacks", "false")
    report = json.loads((out / "report.json").read_text())
    assert report["anchor_used"] is False and report["notes"] and report["scores"]["anchor_cos"] is None
    assert [c["name"] for c in report["checks"]] == ["assimilation_lift", "same_target_ratio"]
    found = all(c["passed"] for c in report["checks"])
    assert report["backdoored"] is False
    assert (report["verdict"], code) == ("inconclusive", 3)
    assert ("collapses the model" if found else "no trigger found") in report["decided_by"]
    assert report["landscape"] is None and not (out / "landscape.png").exists()


def test_exit_codes_one_for_backdoored_three_for_inconclusive_unless_told_otherwise(tiny_models, tmp_path, capsys):
    # rules that pass everything exercise the BACKDOORED path (with an anchor) and the inconclusive one (without
    # an anchor a collapsing trigger can be natural); thresholds are configuration
    quick = ["--trainer.callbacks", "[]", "--model.init_args.evidence_callbacks", "false", "--trainer.max_steps", "2",
             "--model.init_args.name", "m", "--model.init_args.rule", "lit_amdet.decision.ContrastRule"]
    flag_all = ["--model.init_args.anchor", str(tiny_models["siglip"]),
                "--model.init_args.rule.init_args.min_assimilation_ratio", "-1",
                "--model.init_args.rule.init_args.min_assimilation_gap", "-10",
                "--model.init_args.rule.init_args.min_divergence_ratio", "-1"]
    code, out = detect(tmp_path, tiny_models["siglip"], *quick, *flag_all)
    assert code == 1 and capsys.readouterr().out.strip().splitlines()[-1] == "m: BACKDOORED"
    assert json.loads((out / "report.json").read_text())["backdoored"] is True
    code, _ = detect(tmp_path, tiny_models["siglip"], *quick, *flag_all, "--always_exit_zero", "true",
                     out_name="again")
    assert code == 0
    pass_all = ["--model.init_args.rule.init_args.no_anchor_min_lift", "-10",
                "--model.init_args.rule.init_args.no_anchor_min_same_target", "-1"]
    code, out = detect(tmp_path, tiny_models["siglip"], *quick, *pass_all, out_name="no-anchor")
    report = json.loads((out / "report.json").read_text())
    assert code == 3 and capsys.readouterr().out.strip().splitlines()[-1] == "m: inconclusive"
    assert report["verdict"] == "inconclusive" and report["backdoored"] is False
    code, _ = detect(tmp_path, tiny_models["siglip"], *quick, *pass_all, "--always_exit_zero", "true",
                     out_name="no-anchor-again")
    assert code == 0


def test_reference_rule_is_selectable(tiny_models, tmp_path):
    code, out = detect(tmp_path, tiny_models["openclip"], "--model.init_args.anchor", str(tiny_models["openclip"]),
                       "--model.init_args.rule", "lit_amdet.decision.ReferenceRule")
    report = json.loads((out / "report.json").read_text())
    assert report["rule"]["class"] == "ReferenceRule"
    assert "landscape_positive_ratio" in {c["name"] for c in report["checks"]}
    assert code == (1 if report["backdoored"] else 0)


@pytest.mark.parametrize("case", ["other_architecture", "missing_suspect", "empty_prompts", "nan_weights",
                                  "outputs_overflow", "pooled_restarts", "no_restart", "empty_batch",
                                  "run_folder_is_a_file", "end_restarts_on_a_causal_tower"])
def test_bad_input_is_one_line_and_leaves_no_output(tiny_models, tmp_path, capsys, case):
    """Each ends in one line and exit 2. ``outputs_overflow`` (finite weights, one layer scaled by 1e37, so every
    sentence embedding is NaN) was called clean, exit 0, until session 2026-12-07: a NaN fails every check; and
    ``restarts 0`` and ``batch_size 0`` ended in an unexpected division by zero and a library's ValueError."""
    suspect, extra = tiny_models["clip"], []
    if case == "other_architecture":
        extra = ["--model.init_args.anchor", str(tiny_models["bert"])]
    elif case == "missing_suspect":
        suspect = tmp_path / "nowhere"
    elif case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n\n")
        extra = ["--data.init_args.source", str(tmp_path / "empty.txt")]
    elif case == "pooled_restarts":
        extra = ["--model.init_args.restarts", "2", "--model.init_args.pooled_restarts", "3"]
    elif case == "no_restart":
        extra = ["--model.init_args.restarts", "0", "--model.init_args.pooled_restarts", "0"]
    elif case == "empty_batch":
        extra = ["--model.init_args.batch_size", "0"]
    elif case == "end_restarts_on_a_causal_tower":  # under CLIP's causal mask only the end token would see them
        extra = ["--model.init_args.end_restarts", "1"]
    elif case == "run_folder_is_a_file":  # found only after the scan until session 2026-12-07
        (tmp_path / "run").write_text("a file where the run folder goes")
    else:
        import shutil

        import torch
        from safetensors.torch import load_file as load
        from safetensors.torch import save_file

        suspect = tmp_path / "nan_model"
        shutil.copytree(tiny_models["clip"], suspect)
        state = load(str(suspect / "model.safetensors"))
        if case == "nan_weights":  # in the text tower: a scan reads no other (`tests/test_loading.py`)
            first = next(k for k in state if k.startswith("text_model."))
            state[first] = torch.full_like(state[first], float("nan"))
        else:
            fc2 = next(k for k in state if k.endswith("layers.0.mlp.fc2.weight"))
            state[fc2] = state[fc2] * 1e37
            assert all(torch.isfinite(v).all() for v in state.values())
        save_file(state, str(suspect / "model.safetensors"))
        extra = ["--model.init_args.anchor", str(tiny_models["clip"])]
    code, out = detect(tmp_path, suspect, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lit-amdet: error:")
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() or case == "run_folder_is_a_file"
    if case == "run_folder_is_a_file":
        assert "the run folder is a file" in err[-1] and out.read_text().startswith("a file")
    if case == "other_architecture":
        assert "anchor" in err[-1]
    if case == "pooled_restarts":
        assert "pooled_restarts" in err[-1]
    if case == "outputs_overflow":
        assert "the suspect's outputs on clean prompts are not finite" in err[-1]
    if case == "end_restarts_on_a_causal_tower":
        assert "end_restarts: clip is causal" in err[-1]
    if case in ("no_restart", "empty_batch"):
        assert ("restarts must be at least 1" if case == "no_restart" else "batch_size must be at least 1") in err[-1]


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


@pytest.mark.slow  # CI runs it (`make test-slow`); kept out of `make test`'s 15 minutes
def test_ddp_two_processes_on_cpu(tiny_models, tmp_path):
    report = _subprocess_scan(tiny_models, tmp_path, "ddp", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert report["world_size"] == 2
    assert report["scores"]["prompts"] == 8  # the held-out shards were summed over both processes
    assert not list(tmp_path.glob(".detect-*"))


@pytest.mark.slow  # CI runs it (`make test-slow`); kept out of `make test`'s 15 minutes
def test_bf16_mixed_on_cpu(tiny_models, tmp_path):
    report = _subprocess_scan(tiny_models, tmp_path, "bf16", "--trainer.precision", "bf16-mixed")
    assert report["precision"] == "bf16-mixed" and report["verdict"] == "clean"


def test_restarts_run_one_pass_at_a_time_take_the_same_steps(tiny_models, tmp_path):
    """``restarts_per_pass: 1`` frees each restart's graph before the next is built (peak memory of large
    encoders); the trigger must take exactly the steps it takes with every restart in one pass, and so with
    ``auto``, which runs every restart of a tower this small at once."""
    import torch

    common = ("--model.init_args.anchor", str(tiny_models["clip"]), "--model.init_args.check_every", "0",
              "--trainer.max_steps", "4", "--trainer.callbacks", "[]", "--model.init_args.evidence_callbacks",
              "false", "--model.init_args.benign_stop", "false")
    triggers = {}
    used = {}
    for per_pass in ("null", "1", "auto"):
        code, out = detect(tmp_path, tiny_models["clip"], *common, "--model.init_args.restarts_per_pass", per_pass,
                           out_name=f"pass-{per_pass}")
        report = json.loads((out / "report.json").read_text())
        assert code == 0 and report["steps"] == 4
        triggers[per_pass], used[per_pass] = load_file(str(out / "trigger.safetensors"))["all_restarts"], \
            report["restarts_per_pass"]
    assert triggers["null"].shape[0] == 3  # two searched restarts and the swapped one, held from the start
    assert used == {"null": 3, "1": 1, "auto": 3}  # what ran: never more than the restarts there are
    torch.testing.assert_close(triggers["1"], triggers["null"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(triggers["auto"], triggers["null"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_steps", [4, 3])
def test_the_final_scores_are_those_of_the_final_triggers(tiny_models, tmp_path, monkeypatch, max_steps):
    """A search that ends at a check (4 steps, checks every 2) reuses that check's held-out scores instead of a
    second pass over the held-out prompts; one that does not (3 steps) evaluates at the end. Either way the
    reported losses are those of the triggers the search ended with, evaluated afresh here."""
    from lit_amdet import tiny
    from lit_amdet.modules import BackdoorDetection

    anchor = tiny.build_hf_clip(tmp_path / "anchor", arch="CLIPModel", seed=1)
    evaluate, on_train_end = BackdoorDetection.evaluate, BackdoorDetection.on_train_end
    seen = {"calls": 0}

    def counted(self, vectors, restarts=None):
        seen["calls"] += 1
        return evaluate(self, vectors, restarts)

    def end(self):
        seen["fresh"] = [s["loss"] for s in evaluate(self, self.trigger.vectors.detach())]
        before = seen["calls"]
        on_train_end(self)
        seen["at_end"] = seen["calls"] - before

    monkeypatch.setattr(BackdoorDetection, "evaluate", counted)
    monkeypatch.setattr(BackdoorDetection, "on_train_end", end)
    code, out = detect(tmp_path, tiny_models["clip"], "--model.init_args.anchor", str(anchor),
                       "--trainer.max_steps", str(max_steps), "--trainer.callbacks", "[]",
                       "--model.init_args.evidence_callbacks", "false", "--model.init_args.benign_stop", "false",
                       "--model.init_args.patience", "100")
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == max_steps and report["stopped_early"] is None
    assert seen["at_end"] == (0 if max_steps == 4 else 1)
    assert report["restart_losses"] == pytest.approx(seen["fresh"], rel=1e-5, abs=1e-6)


def _fake_restarts(monkeypatch, hit: dict, who: int = 1, base: dict | None = None,
                   hits: dict[int, dict] | None = None) -> None:
    """Replace the scan's held-out evaluation: restart 0 has the lower loss and collapses nothing; restart ``who``
    gets ``hit`` (and each restart of ``hits`` its own) over the same clean-looking scores, updated by ``base``
    (the clean prompts and the initial trigger get those too)."""
    import torch

    from lit_amdet.modules import BackdoorDetection

    def fake_evaluate(self, vectors, restarts=None):
        clean = vectors is None or vectors is self.trigger.initial
        out = []
        for r in restarts or range(1 if vectors is None else vectors.shape[0]):
            s = {"loss": -1.0 if (not clean and r == 0) else 0.0, "assimilation": 0.3, "assimilation_ratio": 0.0,
                 "same_target_mean_cos": 0.2, "same_target_ratio": 0.0, "orig_cos": 0.99, "anchor_cos": 0.99,
                 "different_target_ratio": 0.0, "anchor_assimilation": 0.3, "anchor_pooled_cos": 0.99,
                 "prompts": 8, "target_consistency": 0.5, "anchor_target_consistency": 0.5,
                 "_pooled": torch.ones(self.encoder.embed_dim), "_feature": torch.ones(self.encoder.width),
                 **(base or {})}
            out.append({**s, **({} if clean else {who: hit, **(hits or {})}.get(r, {}))})
        return out

    monkeypatch.setattr(BackdoorDetection, "evaluate", fake_evaluate)


def _fake_swapped(monkeypatch) -> None:
    """Far from the anchor (clean pooled cosine 0.7): restart 0 has the lower loss and collapses nothing; restart 1
    collapses the suspect's token features alone (unshared 0.93); the swapped restart (2) finds as much in the
    anchor (0.93), so the drift explains restart 1's collapse."""
    _fake_restarts(monkeypatch, {"assimilation": 0.95, "assimilation_ratio": 1.0, "same_target_ratio": 1.0},
                   base={"anchor_cos": 0.7, "anchor_pooled_cos": 0.7}, hits={2: {"anchor_assimilation": 0.95}})


def test_a_token_collapse_the_swapped_search_matches_is_inconclusive_whatever_the_losses(tiny_models, tmp_path,
                                                                                          monkeypatch):
    """The swapped restart withholds the accusation (the search runs on), and the verdict rests on the restart
    it cannot clear, not on the lower-loss one that found nothing: `inconclusive`, exit 3, never `clean`."""
    _fake_swapped(monkeypatch)
    code, report = _fake_detect(tiny_models, tmp_path)
    assert [r["objective"] for r in report["restart_scores"]] == ["amdet", "pooled_contrast", "amdet_swapped"]
    assert report["stopped_early"] != "trigger passed the checks" and report["best_restart"] == 1
    assert report["scores"]["unshared_collapse"] == pytest.approx(0.65 / 0.7)
    assert report["scores"]["token_null"] == pytest.approx(0.65 / 0.7)
    assert report["verdict"] == "inconclusive" and code == 3 and "token_null_margin" in report["decided_by"]


def _fake_detect(tiny_models, tmp_path, *extra: str):
    code, out = detect(tmp_path, tiny_models["clip"], "--model.init_args.anchor", str(tiny_models["clip"]), *extra,
                       "--model.init_args.check_every", "1", "--trainer.max_steps", "3", "--trainer.callbacks",
                       "[]", "--model.init_args.evidence_callbacks", "false")
    return code, json.loads((out / "report.json").read_text())


def test_the_restart_that_stops_the_search_is_the_one_that_decides(tiny_models, tmp_path, monkeypatch):
    """Restart 1 passes the checks and stops the search; restart 0 has the lower held-out loss but passes
    nothing. The verdict must rest on restart 1 (before, the lowest loss decided and the model was called clean
    after the search had stopped on a backdoor)."""
    _fake_restarts(monkeypatch, {"assimilation": 0.95, "assimilation_ratio": 1.0, "same_target_mean_cos": 0.99,
                                 "same_target_ratio": 1.0, "orig_cos": 0.2, "anchor_cos": -0.2,
                                 "different_target_ratio": 1.0, "anchor_pooled_cos": -0.2, "target_consistency": 1.0})
    code, report = _fake_detect(tiny_models, tmp_path)
    assert report["stopped_early"] == "trigger passed the checks" and report["steps"] == 1
    assert report["restart_losses"] == [-1.0, 0.0, 0.0]  # the swapped restart, dropped at the start, last
    assert report["best_restart"] == 1 and report["verdict"] == "BACKDOORED" and code == 1
    assert report["passing_restarts"] == [1]


def test_a_restart_the_rule_flags_decides_when_none_passed_the_search(tiny_models, tmp_path, monkeypatch):
    """Restart 1 collapses the suspect's sentence embeddings alone (the pooled path flags it) but its triggered
    prompts do not share one target, so the search never passes; restart 0 has the lower loss and collapses
    nothing. The search stops once restart 1 is flagged at two checks in a row, and the verdict rests on it, not
    on the lowest loss."""
    _fake_restarts(monkeypatch, {"target_consistency": 1.0})  # pooled lift 1.0, the anchor's 0: unshared 1.0
    code, report = _fake_detect(tiny_models, tmp_path)
    assert report["stopped_early"] == "a restart flagged at two checks in a row" and report["steps"] == 2
    assert report["restart_losses"] == [-1.0, 0.0, 0.0] and report["passing_restarts"] == [1]
    assert report["best_restart"] == 1 and report["verdict"] == "BACKDOORED" and code == 1
    assert report["scores"]["pooled_unshared_collapse"] == 1.0
    assert [r["verdict"] for r in report["restart_scores"]] == ["clean", "BACKDOORED", "clean"]


def test_a_null_restart_is_never_judged_or_chosen(tiny_models, tmp_path, monkeypatch):
    """With ``null_restarts 1`` the scan runs a charged and a null restart after the others. The null one measures
    the anchor's collapses: its scores would flag any judged restart (the sentence embeddings collapse alone), yet
    it neither stops the search nor decides the verdict, and the charged one is judged against it."""
    _fake_restarts(monkeypatch, {"target_consistency": 1.0}, who=3)
    code, report = _fake_detect(tiny_models, tmp_path, "--model.init_args.restarts", "2",
                                "--model.init_args.pooled_restarts", "1", "--model.init_args.null_restarts", "1",
                                "--model.init_args.null_min_steps", "0")
    rows = report["restart_scores"]
    assert [r["objective"] for r in rows] == ["amdet", "pooled_contrast", "pooled_charged", "pooled_null",
                                              "amdet_swapped"]
    assert rows[3]["pooled_unshared_collapse"] == 1.0 and rows[3]["verdict"] == "clean"
    assert "pooled_null" in rows[2] and report["best_restart"] != 3
    assert report["verdict"] == "clean" and code == 0
    assert report["stopped_early"] != "a restart flagged at two checks in a row"


def test_end_restarts_are_typed_at_the_end_and_measured_against_a_swapped_search_there(tiny_models, tmp_path):
    """Plumbing on a tiny SigLIP drifted from its anchor (so the swapped restarts run): the end restarts come after
    the others (which start where they always did), each with its slot in report.json, and a swapped one at the
    end as their yardstick. (Detection itself: BENCHMARKS.md, "End restarts".)"""
    import torch

    from lit_amdet import tiny

    other = tiny.build_hf_siglip(tmp_path / "other", arch="SiglipModel", seed=1)
    args = ("--model.init_args.anchor", str(other), "--trainer.callbacks", "[]")
    code, out = detect(tmp_path, tiny_models["siglip"], *args, "--model.init_args.end_restarts", "1")
    report = json.loads((out / "report.json").read_text())
    rows = report["restart_scores"]
    assert [(r["objective"], r["slot"]) for r in rows] == [
        ("amdet", 1), ("pooled_contrast", 1), ("amdet_swapped", 1), ("amdet", "end"), ("amdet_swapped", "end")]
    assert report["trigger"]["position"] == rows[report["best_restart"]]["slot"]
    _, plain = detect(tmp_path, tiny_models["siglip"], *args, out_name="plain")
    before = load_file(str(plain / "trigger.safetensors"))["all_restarts"]
    after = load_file(str(out / "trigger.safetensors"))["all_restarts"]
    assert after.shape[0] == before.shape[0] + 2
    # the same seed: the shipped restarts' random starts are unchanged by the end ones appended after them
    from lit_amdet.amdet import PseudoTrigger

    start = PseudoTrigger(5, 1, after.shape[-1], torch.tensor([[[0.0123]]] * 3 + [[[0.5]]] * 2)).initial
    assert torch.equal(start[:3], PseudoTrigger(3, 1, after.shape[-1], 0.0123).initial)
    assert torch.allclose(start[3:] * 2, PseudoTrigger(5, 1, after.shape[-1], 1.0).initial[3:])
