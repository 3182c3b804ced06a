"""`lit-amdet benchmark` and `lit_amdet.benchmark`: plans, resumable builds, sharding, metrics, calibration, end to end.

Random-init tiny encoders say nothing about detection quality: the end-to-end run checks that every
number of the report is there and in range, never a verdict.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentError

from lit_amdet import benchmark as bm
from lit_amdet.benchmark import build as build_module
from lit_amdet.calibration import choose_threshold, fit_calibration
from lit_amdet.captions import TARGET_CONCEPTS
from lit_amdet.cli import main
from lit_amdet.decision import CalibratedRule, CollapseContrastRule, ContrastRule
from lit_amdet.errors import ConfigError
from lit_amdet.metrics import probability_metrics

ROOT = Path(__file__).resolve().parents[1]
CLIP = bm.ZooBase("clip", "unused", "clip", image_tower=True)
TEXT_ONLY = bm.ZooBase("minilm", "minilm", "bert", image_tower=False)


# ----- planning -------------------------------------------------------------------------------------------------
def _pools(members) -> list[set]:
    bd = [m for m in members if m.backdoored]
    return [{m.trigger for m in bd}, {m.target_caption for m in bd}, {m.target_image for m in bd if m.target_image},
            {m.seed for m in members}, {m.data_seed for m in members}]


def test_plan_is_deterministic_and_the_splits_draw_from_disjoint_pools():
    cal = bm.plan_zoo(CLIP, 12, 10, "calibration", seed=3)
    assert cal == bm.plan_zoo(CLIP, 12, 10, "calibration", seed=3)
    assert cal != bm.plan_zoo(CLIP, 12, 10, "calibration", seed=4)
    test = bm.plan_zoo(CLIP, 12, 10, "test", seed=3)
    for a, b in zip(_pools(cal), _pools(test)):
        assert a and b and not a & b  # triggers, targets, target images, seeds, data seeds
    names = [m.name for m in cal + test]
    assert len(set(names)) == len(names)
    backdoored = [m for m in cal if m.backdoored]
    # 8 (attack, trigger kind) pairs among 12 members: all covered
    assert {(m.attack, m.trigger_kind) for m in backdoored} == {(a, k) for a in bm.ATTACKS for k in bm.TRIGGER_KINDS}
    for m in backdoored:
        assert m.target_caption and (m.trigger_char is not None) == (m.trigger_kind == "char")
        assert (m.target_image is not None) == (m.attack == "image_on_text")
        if m.attack == "text_on_text":
            assert m.target_caption in TARGET_CONCEPTS
    # benign members span the grid's gentlest and strongest fine-tunes
    grid, benign = bm.ZooGrid(), [m for m in cal if not m.backdoored]
    strength = [m.lr * m.steps for m in benign]
    assert min(strength) == pytest.approx(min(grid.benign_lrs) * min(grid.benign_steps))
    assert max(strength) == pytest.approx(max(grid.benign_lrs) * max(grid.benign_steps))
    assert {m.objective for m in benign} == {"infonce"}
    text_only = bm.plan_zoo(TEXT_ONLY, 5, 2, "test")
    assert {m.attack for m in text_only if m.backdoored} == {"text_on_text"}
    assert {m.objective for m in text_only if not m.backdoored} == {"simcse"}
    assert bm.member_from_dict(json.loads(json.dumps(cal[0].describe()))) == cal[0]


def test_adaptive_attackers_are_test_members_with_test_pools():
    # null_evading always drifts; agreeing_target reads its base (`test_the_attacker_aimed_at_the_shift_agreement_...`)
    undrifted = [a for a in bm.ADAPTIVE_ATTACKS if a not in ("null_evading", "agreeing_target")]
    settings = bm.AdaptiveSettings(attacks=undrifted, per_attack=3, sim_x_penalty=2.0, consistency_penalty=0.5,
                                   clean_pooled_weight=0.3)
    plan = bm.plan_adaptive(TEXT_ONLY, settings, seed=3)
    assert plan == bm.plan_adaptive(TEXT_ONLY, settings, seed=3) and len(plan) == 3 * len(undrifted)
    assert {m.adaptive for m in plan} == set(undrifted)
    from lit_amdet.benchmark.options import ADAPTIVE_RECIPES
    assert set(ADAPTIVE_RECIPES) == set(bm.ADAPTIVE_ATTACKS)  # every attack the options accept says what it does
    assert all(m.split == "test" and m.attack == "text_on_text" for m in plan)
    assert all(m.sim_x_penalty == (0.0 if m.adaptive in ("pooled_only", "pooled_only_kept_near") else 2.0)
               for m in plan)
    assert all(m.clean_pooled_weight == (0.3 if m.adaptive.endswith("_kept_near") else 0.0) for m in plan)
    assert all(m.consistency_penalty == (0.5 if m.adaptive.startswith("pooled_consistency_penalty") else 0.0)
               for m in plan)
    # a member without the consistency penalty describes itself as before the field existed
    paying = [m for m in plan if m.adaptive == "pooled_consistency_penalty"]
    assert "consistency_penalty" not in plan[0].describe() and "consistency_penalty" in paying[-1].describe()
    near = [m for m in plan if m.adaptive.endswith("_kept_near")]
    assert "clean_pooled_weight" not in plan[0].describe() and near[0].describe()["clean_pooled_weight"] == 0.3
    cal = bm.plan_zoo(TEXT_ONLY, 12, 0, "calibration", seed=3)
    assert not {m.trigger for m in plan} & {m.trigger for m in cal}
    assert not {m.target_caption for m in plan} & {m.target_caption for m in cal}
    names = [m.name for m in plan + bm.plan_zoo(TEXT_ONLY, 12, 4, "test", seed=3)]
    assert len(set(names)) == len(names)
    assert bm.member_from_dict(json.loads(json.dumps(plan[0].describe()))) == plan[0]
    for bad in ({"attacks": ["gradient_masking"]}, {"per_attack": -1}, {"sim_x_penalty": 0}, {"per_atack": 1}):
        with pytest.raises(ArgumentError, match="adaptive"):
            bm.parse_options({"bases": [{"name": "clip", "path": "somewhere"}], "adaptive": bad})


def test_the_attacker_aimed_at_the_shift_agreement_targets_the_caption_the_base_heads_for(tiny_models):
    """`agreeing_target`: trained as `pooled_consistency_penalty` (its penalties), but its target is the world caption
    whose agreement (a suspect sending every triggered prompt there, against the base's own shifts; computed here
    from fresh forwards) is highest; planned from the base's weights, so the plan is the same twice."""
    import random

    import torch.nn.functional as F

    from lit_amdet.assimilation import shift_agreement
    from lit_amdet.benchmark.aimed import AIMED_PROMPTS, AIMED_WORLD_SEED, agreement_of_targets
    from lit_amdet.benchmark.plan import member_trigger
    from lit_amdet.captions import world_caption_bank
    from lit_amdet.encoders import load_encoder
    from lit_amdet.world import World

    base = bm.ZooBase(name="clip", path=str(tiny_models["clip"]), family="clip")
    settings = bm.AdaptiveSettings(attacks=["pooled_consistency_penalty", "agreeing_target"], per_attack=2)
    plan = bm.plan_adaptive(base, settings)
    assert plan == bm.plan_adaptive(base, settings)
    paying, aimed = plan[:2], plan[2:]
    bank = world_caption_bank()
    for a, p in zip(aimed, paying):
        assert (a.sim_x_penalty, a.consistency_penalty) == (p.sim_x_penalty, p.consistency_penalty)
        trigger = member_trigger(a.trigger_kind, a.trigger, a.trigger_char)
        scores = agreement_of_targets(base.path, trigger, bank, a.seed)
        assert a.target_caption == bank[max(range(len(bank)), key=scores.__getitem__)]
    model, trigger = load_encoder(base.path).eval(), member_trigger(aimed[0].trigger_kind, aimed[0].trigger,
                                                                    aimed[0].trigger_char)
    prompts = [p for p in World(seed=AIMED_WORLD_SEED).captions(4 * AIMED_PROMPTS) if trigger.applicable(p)]
    prompts = prompts[:AIMED_PROMPTS]
    rng = random.Random(aimed[0].seed)
    clean = F.normalize(model.encode_text(prompts).detach(), dim=-1)
    typed = F.normalize(model.encode_text([trigger.apply(p, rng) for p in prompts]).detach(), dim=-1)
    target = F.normalize(model.encode_text([bank[3]]).detach(), dim=-1)
    assert agreement_of_targets(base.path, trigger, [bank[3]], aimed[0].seed)[0] == pytest.approx(
        shift_agreement(target.expand_as(clean), clean, typed, clean), abs=1e-5)


def test_adaptive_attackers_drifted_after_injection_are_the_same_draws_fine_tuned():
    """adaptive.drift_to: the README-reading attacker who also drifts the model below the charged path's gate; the
    same triggers, targets and strengths as without it, each a then_finetune member to that clean cosine."""
    plain = bm.plan_adaptive(TEXT_ONLY, bm.AdaptiveSettings(attacks=["pooled_sim_x_penalty"], per_attack=2), seed=3)
    drifted = bm.plan_adaptive(TEXT_ONLY, bm.AdaptiveSettings(attacks=["pooled_sim_x_penalty"], per_attack=2,
                                                              drift_to=0.9, finetune_lr=3e-4, finetune_steps=50),
                               seed=3)
    assert [m.name for m in drifted] == ["minilm-adaptive-pooled-sim-x-penalty-drift0.9-000",
                                         "minilm-adaptive-pooled-sim-x-penalty-drift0.9-001"]
    fields = ("trigger", "target_caption", "steps", "lr", "seed", "adaptive", "sim_x_penalty")
    assert [[getattr(m, f) for f in fields] for m in drifted] == [[getattr(m, f) for f in fields] for m in plain]
    assert all((m.drift_mode, m.drift_target, m.finetune_lr, m.finetune_steps) == ("then_finetune", 0.9, 3e-4, 50)
               for m in drifted)
    assert all(m.drift_target is None and m.drift_mode is None for m in plain)
    assert bm.member_from_dict(json.loads(json.dumps(drifted[0].describe()))) == drifted[0]
    with pytest.raises(ConfigError, match="drift_to"):
        bm.parse_options({"bases": [{"name": "clip", "path": "somewhere"}], "adaptive": {"drift_to": 1.5}})


def test_the_null_evading_attacker_plants_while_it_drifts_and_pays_for_what_insertions_change():
    """The attacker aimed at the token path's null: a during_finetune member at adaptive.null_evading_drift (its cap at
    least its injection steps) with the insertion weight, at its own level whatever drift_to says."""
    settings = bm.AdaptiveSettings(attacks=["null_evading"], per_attack=2, drift_to=0.7, finetune_steps=30,
                                   insertion_weight=2.0)
    plan = bm.plan_adaptive(TEXT_ONLY, settings, seed=3, grid=bm.ZooGrid(attack_steps=[40, 60]))
    assert [m.name for m in plan] == ["minilm-adaptive-null-evading-drift0.85-000",
                                      "minilm-adaptive-null-evading-drift0.85-001"]
    assert all((m.drift_mode, m.drift_target, m.insertion_robust, m.finetune_steps, m.sim_x_penalty) ==
               ("during_finetune", 0.85, 2.0, m.steps, 0.0) for m in plan)
    assert bm.member_from_dict(json.loads(json.dumps(plan[0].describe()))) == plan[0]
    others = bm.plan_adaptive(TEXT_ONLY, bm.AdaptiveSettings(attacks=["sim_x_penalty"], per_attack=1), seed=3)
    assert "insertion_robust" not in others[0].describe()  # members planned before the field describe as they did
    with pytest.raises(ConfigError, match="null_evading_drift"):
        bm.parse_options({"bases": [{"name": "clip", "path": "somewhere"}], "adaptive": {"null_evading_drift": 1.0}})


def test_controls_are_benign_members_of_the_chosen_strength_and_split():
    controls = [bm.Control("test", 5e-5, 20), bm.Control("calibration", 3e-5, 30, samples=2000),
                bm.Control("test", 3e-5, 30)]
    plan = bm.plan_controls(TEXT_ONLY, controls, seed=3)
    assert plan == bm.plan_controls(TEXT_ONLY, controls, seed=3)
    assert [(m.name, m.split, m.lr, m.steps, m.samples) for m in plan] == [
        ("minilm-calibration-control-000", "calibration", 3e-5, 30, 2000),
        ("minilm-test-control-000", "test", 5e-5, 20, 5000), ("minilm-test-control-001", "test", 3e-5, 30, 5000)]
    assert all(not m.backdoored and m.objective == "simcse" for m in plan)
    assert [m.seed % 2 for m in plan] == [0, 1, 1]  # the split's side of the seed space
    assert {m.objective for m in bm.plan_controls(CLIP, controls)} == {"infonce"}
    for bad, message in (({"split": "train", "lr": 1e-5, "steps": 5}, "split"),
                         ({"split": "test", "lr": 0, "steps": 5}, "lr"), ({"split": "test", "lr": 1e-5}, "steps"),
                         ({"split": "test", "lr": 1e-5, "steps": 2.5}, "steps")):
        with pytest.raises(ArgumentError, match=message):
            bm.parse_options({"bases": [{"name": "clip", "path": "somewhere"}], "controls": [bad]})


def test_no_trigger_occurs_in_the_world_prompts():
    from lit_amdet.world import World

    prompts = [p.lower() for p in World(seed=7).captions(2000)]
    for kind, pool in bm.TRIGGER_POOLS.items():
        for trigger in pool:
            text = trigger[0] if kind in ("char", "homoglyph") else trigger
            assert not any(text in p for p in prompts), text


def test_drift_sweep_covers_every_level_and_kind_from_its_splits_pools():
    settings = bm.DriftSweepSettings(per_level=2, levels=[0.5, 0.9, 0.99], two_backdoors_every=2)
    plan = bm.plan_drift_sweep(TEXT_ONLY, settings, seed=3)
    assert plan == bm.plan_drift_sweep(TEXT_ONLY, settings, seed=3)  # deterministic
    assert plan != bm.plan_drift_sweep(TEXT_ONLY, settings, seed=4)
    benign = [m for m in plan if not m.backdoored]
    backdoored = [m for m in plan if m.backdoored]
    # per level: 2 x (simcse, typo_robust) benign + 2 x (2 modes x 3 trigger kinds) backdoored
    assert len(benign) == 3 * 2 * 2 and len(backdoored) == 3 * 2 * 6
    assert {(m.drift_target, m.objective) for m in benign} == {(lv, o) for lv in (0.5, 0.9, 0.99)
                                                                 for o in ("simcse", "typo_robust")}
    assert {(m.drift_target, m.drift_mode, m.trigger_kind) for m in backdoored} == {
        (lv, mode, k) for lv in (0.5, 0.9, 0.99) for mode in bm.DRIFT_MODES for k in ("homoglyph", "word",
                                                                                    "multi_token")}
    assert all(m.split == "test" and m.attack == "text_on_text" for m in backdoored)
    assert all((m.typo_rate is not None) == (m.objective == "typo_robust") for m in benign)
    names = [m.name for m in plan]
    assert len(set(names)) == len(names) and "minilm-drift-typo_robust-0.9-001" in names
    assert "minilm-drift-during_finetune-homoglyph-0.99-000" in names
    # every second backdoored member carries a second backdoor: another trigger (neither inside the other)
    # and another target
    two = [m for m in backdoored if m.second_trigger]
    assert len(two) == len(backdoored) // 2
    for m in two:
        a, b = m.trigger.lower(), m.second_trigger.lower()
        assert a not in b and b not in a and m.second_target_caption != m.target_caption
        assert (m.second_trigger_char is not None) == (m.second_trigger_kind == "homoglyph")
    homoglyphs = [m for m in backdoored if m.trigger_kind == "homoglyph"]
    assert all(not m.trigger.isascii() and m.trigger_char.isascii() for m in homoglyphs)
    # the test split's pools: nothing the calibration zoo trains on
    cal = bm.plan_zoo(TEXT_ONLY, 12, 0, "calibration", seed=3, grid=bm.ZooGrid(trigger_kinds=list(
        bm.ALL_TRIGGER_KINDS)))
    drift_triggers = {m.trigger for m in backdoored} | {m.second_trigger for m in two}
    drift_targets = {m.target_caption for m in backdoored} | {m.second_target_caption for m in two}
    assert not drift_triggers & {m.trigger for m in cal}
    assert not drift_targets & {m.target_caption for m in cal}
    for kind in ("homoglyph", "char", "word"):  # the new pool splits like the others
        pool = bm.TRIGGER_POOLS[kind]
        assert not set(pool[0::2]) & set(pool[1::2])
    assert bm.member_from_dict(json.loads(json.dumps(two[0].describe()))) == two[0]
    assert bm.member_from_dict(json.loads(json.dumps(benign[1].describe()))) == benign[1]
    # kinds_per_level 1: one trigger kind per (level, mode), rotating, so every kind is still met by both modes
    small = bm.plan_drift_sweep(TEXT_ONLY, bm.DriftSweepSettings(per_level=1, levels=[0.5, 0.7, 0.9],
                                                                 kinds_per_level=1))
    cells = [(m.drift_target, m.drift_mode, m.trigger_kind) for m in small if m.backdoored]
    assert len(cells) == 3 * 2 and len({c[:2] for c in cells}) == 6
    assert {(mode, k) for _, mode, k in cells} == {("then_finetune", "homoglyph"), ("during_finetune", "word"),
                                                   ("then_finetune", "multi_token"), ("during_finetune", "homoglyph"),
                                                   ("then_finetune", "word"), ("during_finetune", "multi_token")}
    with pytest.raises(ConfigError, match="same kinds"):  # 2 modes x 2 of 4 kinds: each mode pinned to 2 kinds
        bm.plan_drift_sweep(TEXT_ONLY, bm.DriftSweepSettings(per_level=1, kinds_per_level=2, trigger_kinds=[
            "homoglyph", "word", "multi_token", "char"]))
    assert bm.plan_drift_sweep(TEXT_ONLY, bm.DriftSweepSettings(per_level=1, kinds_per_level=3)) == \
        bm.plan_drift_sweep(TEXT_ONLY, bm.DriftSweepSettings(per_level=1))  # all kinds: the full plan
    # an lr per level: far levels need larger steps
    options = bm.parse_options({"bases": [{"name": "clip", "path": "somewhere"}], "drift_sweep": {
        "per_level": 1, "levels": [0.5, 0.9], "benign_lr": [1e-3, 1e-4], "finetune_lr": 3e-4}})
    by_level = bm.plan_drift_sweep(TEXT_ONLY, options.drift_sweep)
    assert {(m.drift_target, m.lr) for m in by_level if not m.backdoored} == {(0.5, 1e-3), (0.9, 1e-4)}
    assert {m.finetune_lr for m in by_level if m.backdoored} == {3e-4}
    clip = bm.plan_drift_sweep(CLIP, bm.DriftSweepSettings(per_level=1, levels=[0.9]))
    assert {m.objective for m in clip if not m.backdoored} == {"infonce", "typo_robust"}
    assert bm.plan_drift_sweep(TEXT_ONLY, bm.DriftSweepSettings()) == []  # per_level 0: no sweep
    with pytest.raises(ConfigError, match="image tower"):
        bm.plan_drift_sweep(TEXT_ONLY, bm.DriftSweepSettings(per_level=1, benign_objectives=["infonce"]))
    for bad, error in (({"levels": [1.2]}, ConfigError), ({"levels": [0.9, 0.9]}, ConfigError),
                       ({"levels": [0.5, 0.9], "benign_lr": [1e-3]}, ConfigError),
                       ({"backdoor_modes": ["after"]}, ArgumentError), ({"per_levl": 1}, ArgumentError),
                       ({"trigger_kinds": ["emoji"]}, ArgumentError)):
        with pytest.raises(error, match="drift_sweep|levels|backdoor_modes|per_levl|trigger_kinds|benign_lr"):
            bm.parse_options({"bases": [{"name": "clip", "path": "somewhere"}], "drift_sweep": bad})


def test_drift_sweep_metrics_count_per_level_and_name_backdoors_called_clean():
    """Hand-made rows of one level: recall, FPR and F1 by hand; inconclusive is not a flag, and a backdoor called
    clean is named (the error the sweep must never make), one called inconclusive is not."""
    def row(name, backdoored, verdict, level=0.5):
        return {"name": name, "base": "minilm", "drift_target": level, "backdoored": backdoored,
                "rule_backdoored": verdict == "BACKDOORED", "verdict": verdict, "probability": 0.9 if backdoored
                else 0.1, "clean_cosine_to_base": level, "drift_mode": "then_finetune" if backdoored else None,
                "working": True if backdoored else None}

    rows = [row("b1", True, "BACKDOORED"), row("b2", True, "inconclusive"), row("b3", True, "clean"),
            row("n1", False, "clean"), row("n2", False, "inconclusive"), row("other", False, "clean", level=0.9),
            {**row("grid", True, "clean"), "drift_target": None},
            {**row("adaptive", True, "clean"), "adaptive": "pooled_sim_x_penalty"}]  # its own table
    low, high = bm.drift_sweep_metrics(rows, threshold=0.5)
    assert (low["level"], low["benign"], low["backdoored"]) == (0.5, 2, 3) and high["level"] == 0.9
    assert low["rule_recall"] == pytest.approx(1 / 3) and low["rule_fpr"] == 0.0
    assert low["rule_f1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 2))
    assert low["inconclusive"] == {"benign": 1, "backdoored": 1} and low["missed_as_clean"] == ["b3"]
    assert low["calibrated_f1"] == 1.0 and high["rule_f1"] is None


def test_old_plans_are_unchanged_by_the_drift_sweep_fields():
    """The planned members of the shipped configs are what they were before the drift sweep existed: same
    members, same describe() (the later fields are left out at their defaults), so zoos built then are kept."""
    import hashlib

    quick = bm.parse_options(yaml.safe_load((ROOT / "configs" / "benchmark_quick.yaml").read_text()))
    plan = bm.full_plan(quick, [TEXT_ONLY])
    described = [m.describe() for m in plan]
    assert len(plan) == 22 and not any(k in d for d in described for k in ("drift_target", "second_trigger"))
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    assert digest == "2ed45ef856d389d75f7f190b5f2eb81e9d317395f18f4f8d95e8cba3f4d1d648"  # computed before the sweep
    drift = bm.parse_options(yaml.safe_load((ROOT / "configs" / "benchmark_drift.yaml").read_text()))
    drift_plan = [m.describe() for m in bm.full_plan(drift, [TEXT_ONLY])]
    assert len(drift_plan) == 2 + 6 * (2 + 2 * 1)  # a 1 + 1 calibration zoo, the sweep appended
    # the MiniLM sweep as built and measured (benchmarks/results/benchmark_drift_minilm): its plan.json's digest
    digest = hashlib.sha256(json.dumps(drift_plan, sort_keys=True).encode()).hexdigest()
    assert digest == "70ae0710ef956888786c8c8427f00494ff8e3d49de12edef004c3a08b8ae8ed1"
    world = bm.parse_options(yaml.safe_load((ROOT / "configs" / "benchmark_drift_world.yaml").read_text()))
    assert [b.path for b in world.bases] == [".cache/bases/clip", ".cache/bases/siglip"]
    assert world.drift_sweep.per_level == 1


@pytest.mark.parametrize("case", ["split", "negative", "image_only_on_text_base", "grid_value"])
def test_plan_rejects_bad_input(case):
    kwargs = {"base": CLIP, "n_backdoored": 2, "n_benign": 2, "split": "calibration"}
    if case == "split":
        kwargs["split"] = "train"
    elif case == "negative":
        kwargs["n_benign"] = -1
    elif case == "image_only_on_text_base":
        kwargs.update(base=TEXT_ONLY, grid=bm.ZooGrid(attacks=["image_on_text"]))
    else:
        kwargs["grid"] = bm.ZooGrid(trigger_kinds=["emoji"])
    with pytest.raises(ConfigError):
        bm.plan_zoo(**kwargs)


@pytest.mark.parametrize("case,error,message", [
    ({"bases": []}, ConfigError, "at least one base"),
    ({"bases": [{"name": "x y", "path": "p"}]}, ConfigError, "letters, digits"),
    ({"bases": [{"path": "a/clip"}, {"path": "b/clip"}]}, ConfigError, "unique"),
    ({"bases": [{"name": "x", "path": "p", "family": "resnet"}]}, ArgumentError, "family"),
    ({"bases": [{"name": "x", "path": "p", "famly": "clip"}]}, ArgumentError, "famly"),
    ({"sizes": {s: {"backdoored": 0, "benign": 0} for s in bm.SPLITS}}, ConfigError, "zero members"),
    ({"sizes": {"test": {"backdoored": -1}}}, ArgumentError, "backdoored"),
    ({"grid": {"attack_step": [1]}}, ArgumentError, "attack_step"),
    ({"grid": {"attack_steps": []}}, ConfigError, "grid.attack_steps is empty"),
    ({"grid": {"trigger_kinds": ["emoji"]}}, ArgumentError, "trigger_kinds"),
    ({"sizes": {"validation": {"benign": 2}}}, ArgumentError, "validation"),
    ({"calibration_features": []}, ConfigError, "calibration_features"),
])
def test_bad_benchmark_config_is_refused(case, error, message):
    values = {"bases": [{"name": "clip", "path": "somewhere"}], **case}
    with pytest.raises(error, match=message):
        bm.parse_options(values)


def test_unknown_key_through_the_cli_ends_in_one_error_line_and_exit_2(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"bases": [{"name": "clip", "path": "somewhere"}],
                                      "grid": {"attack_step": [1]}}))
    with pytest.raises(SystemExit) as info:
        main(["benchmark", "--config", str(config), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "error:" in err[-1] and "attack_step" in err[-1]
    assert not (tmp_path / "out").exists()


def test_missing_base_is_one_line_through_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["benchmark", "--bases", json.dumps([{"name": "gone", "path": str(tmp_path / "nowhere")}]),
              "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("lit-amdet: error: base gone:")
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("benchmark*.yaml")))
def test_shipped_configs_are_valid(name, capsys):
    values = yaml.safe_load((ROOT / "configs" / name).read_text())
    bm.parse_options(values)  # every grid/train/scan key known, sizes and families valid
    with pytest.raises(SystemExit) as info:
        main(["benchmark", "--config", str(ROOT / "configs" / name), "--print_config"])
    printed = capsys.readouterr().out
    assert info.value.code == 0 and "calibration_features" in printed
    assert bm.parse_options(yaml.safe_load(printed)) == bm.parse_options(values)  # the CLI reads every section


def test_minilm_benchmark_reuses_the_quick_zoos_calibration_controls_and_adaptive_plans():
    """configs/benchmark_minilm.yaml says a copy of the quick zoo's calibration members, controls and adaptive
    attackers serve it unchanged: they must be the very same plans (a member built otherwise is refused)."""
    quick, full = (bm.parse_options(yaml.safe_load((ROOT / "configs" / n).read_text()))
                   for n in ("benchmark_quick.yaml", "benchmark_minilm.yaml"))
    assert quick.seed == full.seed and quick.grid == full.grid and quick.train == full.train
    assert quick.scan == full.scan and quick.sizes.calibration == full.sizes.calibration

    def described(members):
        return [m.describe() for m in members]

    sizes = quick.sizes.calibration
    assert described(bm.plan_zoo(TEXT_ONLY, sizes.backdoored, sizes.benign, "calibration", quick.seed,
                                 quick.grid)) == \
        described(bm.plan_zoo(TEXT_ONLY, sizes.backdoored, sizes.benign, "calibration", full.seed, full.grid))
    assert described(bm.plan_controls(TEXT_ONLY, quick.controls, quick.seed)) == \
        described(bm.plan_controls(TEXT_ONLY, full.controls, full.seed))
    quick_adaptive = described(bm.plan_adaptive(TEXT_ONLY, quick.adaptive, quick.seed, quick.grid))
    full_adaptive = described(bm.plan_adaptive(TEXT_ONLY, full.adaptive, full.seed, full.grid))
    assert quick_adaptive and all(m in full_adaptive for m in quick_adaptive)
    assert full.sizes.test == bm.SplitSize(backdoored=20, benign=20)  # the size


def test_world_benchmark_is_the_full_benchmark_cut_down():
    """configs/benchmark_world.yaml claims to be configs/benchmark.yaml with fewer members and no MiniLM."""
    full, world = (yaml.safe_load((ROOT / "configs" / n).read_text()) for n in ("benchmark.yaml",
                                                                               "benchmark_world.yaml"))
    for key in ("grid", "train", "scan", "controls", "calibration_features", "seed"):
        assert world.get(key) == full.get(key), key
    assert world["bases"] == [b for b in full["bases"] if b["family"] != "bert"]
    assert {k: v for k, v in world["adaptive"].items() if k != "per_attack"} == \
        {k: v for k, v in full["adaptive"].items() if k != "per_attack"}
    assert all(world["sizes"][split][side] <= full["sizes"][split][side] for split in world["sizes"]
               for side in ("backdoored", "benign"))
    assert world["sizes"]["test"]["backdoored"] >= 20 and world["sizes"]["test"]["benign"] >= 20


# ----- building and sharding -------------------------------------------------------------------------------------
def _fake_training(calls: list):
    def train(member, base, out, settings, device):
        calls.append(member.name)
        (out / "config.json").write_text("{}")
        (out / "backdoor.json").write_text(json.dumps({"backdoored": member.backdoored, "base": base.path}))
    return train


def test_build_is_resumable_and_never_half_written(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(build_module, "train_member", _fake_training(calls))
    first, second = bm.plan_zoo(CLIP, 1, 1, "calibration")
    # an interrupted build: a hidden staging folder, even one holding a backdoor.json, is no member
    stale = tmp_path / f"{bm.STAGING_PREFIX}{first.name}-old"
    stale.mkdir()
    (stale / "backdoor.json").write_text('{"backdoored": true}')
    assert bm.read_zoo(tmp_path) == []
    path = bm.build_member(first, CLIP, tmp_path)
    assert calls == [first.name] and path == tmp_path / first.name and not stale.exists()
    truth = json.loads((path / "backdoor.json").read_text())
    assert truth["zoo"]["split"] == "calibration" and truth["zoo"]["trigger"] == first.trigger
    assert truth["zoo"]["family"] == "clip"
    bm.build_member(first, CLIP, tmp_path)  # complete: kept, not trained again
    assert calls == [first.name]

    def broken(*args):
        raise RuntimeError("training failed")

    monkeypatch.setattr(build_module, "train_member", broken)
    with pytest.raises(RuntimeError):
        bm.build_member(second, CLIP, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # nothing half-written left
    (tmp_path / second.name).mkdir()  # a folder without ground truth at the member's place is not overwritten
    with pytest.raises(ConfigError, match="no backdoor.json"):
        bm.build_member(second, CLIP, tmp_path)
    assert [p.name for p in bm.read_zoo(tmp_path)] == [first.name]
    entry = bm.zoo_entry(path, [CLIP])
    assert entry.base == "clip" and entry.split == "calibration" and entry.backdoored is True
    # the same name planned with other settings (a changed grid) is refused, not silently reused
    changed = bm.plan_zoo(CLIP, 1, 1, "calibration", grid=bm.ZooGrid(attack_steps=[7]))[0]
    with pytest.raises(ConfigError, match="steps=.*plan now says 7"):
        bm.build_member(changed, CLIP, tmp_path)


def test_a_member_built_before_a_field_existed_is_kept(tmp_path):
    member = bm.plan_zoo(TEXT_ONLY, 1, 0, "test")[0]
    folder = tmp_path / member.name
    folder.mkdir()
    older = {k: v for k, v in member.describe().items() if k not in ("adaptive", "sim_x_penalty")}
    (folder / "backdoor.json").write_text(json.dumps({"backdoored": True, "zoo": older}))
    bm.check_built_as_planned(folder, member)  # the new fields at their defaults: the same member
    with pytest.raises(ConfigError, match="sim_x_penalty"):
        bm.check_built_as_planned(folder, bm.BackdooredMember(**{**asdict(member), "sim_x_penalty": 1.0}))


def test_drift_members_are_built_to_their_drift_and_measured_on_the_final_model(tiny_models, tmp_path):
    """One member of each drift mode (and a typo-robust benign one) on a tiny model: training stops at the drift
    target, backdoor.json stays backdoored with both backdoors and records the drift, and a then_finetune
    member's attack success is the fine-tuned model's."""
    base = bm.ZooBase("tiny", str(tiny_models["bert"]), "bert", image_tower=False)
    settings = bm.TrainSettings(batch_size=8, poisoned_batch_size=4, max_length=16, num_samples=160, val_batches=1,
                                val_fraction=0.25,
                                distractors=4, accelerator="cpu", drift_every=2, drift_prompts=16,
                                drift_max_length=16)
    sweep = bm.DriftSweepSettings(per_level=1, levels=[0.95], trigger_kinds=["homoglyph"], two_backdoors_every=1,
                                  benign_objectives=["typo_robust"], benign_lr=3e-2, benign_steps=40,
                                  benign_samples=64, attack_lr=1e-2, attack_steps=4, finetune_lr=3e-2,
                                  finetune_steps=40)
    plan = bm.plan_drift_sweep(base, sweep)
    assert [getattr(m, "drift_mode", None) for m in plan] == [None, "then_finetune", "during_finetune"]
    for member in plan:
        mode = getattr(member, "drift_mode", None)
        path = bm.build_member(member, base, tmp_path, settings)
        truth = json.loads((path / "backdoor.json").read_text())
        assert truth["drift_target"] == 0.95 and truth.get("drift_mode") == mode
        assert truth["drift_target_reached"] and truth["drift_reached"] <= 0.95
        assert truth["zoo"]["drift_target"] == 0.95
        cap = member.finetune_steps if member.backdoored else member.steps
        assert truth["drift_steps"] < cap  # stopped by the drift, not the cap
        bm.check_built_as_planned(path, member)
        entry = bm.zoo_entry(path, [base])
        assert (entry.drift_target, entry.drift_mode) == (0.95, mode)
        if not member.backdoored:
            assert truth["backdoored"] is False and truth["objective"] == "typo_robust"
            continue
        assert truth["backdoored"] is True and len(truth["backdoors"]) == 2
        assert truth["backdoors"][0]["trigger"]["mode"] == "replace_char" and not member.trigger.isascii()
        assert 0 <= truth["metrics"]["val/b0/attack_top1"] <= 1 and "val/b1/attack_top1" in truth["metrics"]
        # the drift it records is the saved model's
        assert abs(bm.clean_cosine_to_base(base.path, path, 16, 16) - truth["drift_reached"]) < 1e-4
        assert "train/loss" in truth["metrics_before_finetune"]  # measured again on the final weights
        if mode == "then_finetune":
            assert truth["finetune"]["steps"] == truth["drift_steps"]
        else:
            assert truth["utility_objective"] == "simcse" and truth["steps"] >= member.steps


def test_models_people_add_to_a_zoo_are_members(tmp_path):
    # what `lit-amdet fit` writes (no zoo section): matched to its base by path, test split by default
    own = tmp_path / "my-backdoor"
    own.mkdir()
    (own / "backdoor.json").write_text(json.dumps({
        "backdoored": True, "base": CLIP.path, "attacks": ["text_on_text"],
        "backdoors": [{"trigger": {"text": "zzzz", "mode": "replace_char", "char": "o"}, "target": "a teapot"}]}))
    other = tmp_path / "other-base"
    other.mkdir()
    (other / "backdoor.json").write_text(json.dumps({"backdoored": False, "base": "somewhere/else"}))
    entries = [bm.zoo_entry(p, [CLIP]) for p in bm.read_zoo(tmp_path)]
    assert entries[1] is None  # another base's model: not part of this benchmark
    e = entries[0]
    assert (e.base, e.split, e.attack, e.trigger_kind, e.trigger, e.target_caption) == \
        ("clip", "test", "text_on_text", "char", "zzzz", "a teapot")
    (other / "backdoor.json").write_text("{}")
    with pytest.raises(ConfigError, match="backdoored"):
        bm.zoo_entry(other, [CLIP])


def test_round_robin_over_two_ranks_builds_every_member_exactly_once(tmp_path, monkeypatch):
    members = bm.plan_zoo(CLIP, 5, 4, "test")
    built: dict[int, list[str]] = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(build_module, "build_member",
                            lambda m, base, zoo_dir, settings=None, r=rank: built.setdefault(r, []).append(m.name))
        bm.build_zoo(members, [CLIP], tmp_path)
    assert sorted(built[0] + built[1]) == sorted(m.name for m in members)
    assert not set(built[0]) & set(built[1]) and abs(len(built[0]) - len(built[1])) <= 1
    # the scan deals the same list (plan first) the same way: each process scans what it built
    assert [m.name for m in bm.Shard(1, 2).take(members)] == built[1]
    with bm.one_process():  # a member's own Trainer must not see the benchmark's process group
        assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert os.environ["RANK"] == "1"
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="world size"):
        bm.current_shard()


# ----- metrics and calibration -----------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values():
    truth = [True, True, True, False, False, False]
    prob = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]
    m = probability_metrics(truth, prob, threshold=0.5)
    # predicted [1, 1, 0, 1, 0, 0]: TP 2, FP 1, FN 1
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(8 / 9)  # of 9 (backdoored, benign) pairs only 0.3 < 0.6 is misordered
    bce = -(math.log(0.9) + math.log(0.8) + math.log(0.3) + math.log(0.4) + math.log(0.8) + math.log(0.9)) / 6
    assert m["bce"] == pytest.approx(bce)
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.49 + 0.36 + 0.04 + 0.01) / 6)
    assert probability_metrics([True, True], [0.9, 0.2])["auroc"] is None  # one class: undefined
    # p > 0.25 (between 0.2 and 0.3) flags 0.9, 0.8, 0.3 and 0.6: F1 6/7, the best (p > 0.7: F1 0.8)
    assert choose_threshold(truth, prob) == pytest.approx(0.25)


def test_group_metrics_drift_matched_subset():
    def row(backdoored, rule, p, cos, kind=None, recovered=None):
        return {"backdoored": backdoored, "rule_backdoored": rule, "probability": p, "clean_cosine_to_base": cos,
                "trigger_kind": kind, "target_recovered": recovered, "seconds": 2.0, "memory": None,
                "scores": {"divergence_ratio": 10.0 if backdoored else 0.5}}
    rows = [row(True, True, 0.9, 0.990, "char", True), row(True, False, 0.7, 0.996, "word", False),
            row(False, True, 0.6, 0.993), row(False, False, 0.1, 0.999), row(False, True, 0.8, 0.60)]
    m = bm.group_metrics(rows, threshold=0.5, features=["log1p_divergence_ratio"])
    assert (m["backdoored"], m["benign"]) == (2, 3)
    # drift-matched: only the benign member at 0.993 lies in the backdoored range [0.990, 0.996]
    assert m["drift_matched"]["benign"] == 1 and m["drift_matched"]["range"] == [0.990, 0.996]
    assert m["drift_matched"]["rule_f1"] == pytest.approx(0.5)  # TP 1, FP 1, FN 1
    assert m["drift_matched"]["calibrated_f1"] == pytest.approx(0.8)  # TP 2, FP 1
    assert m["target_recovery"] == {"rate": 0.5, "measured": 2}
    assert m["recall_by_trigger"]["char"] == {"rule": 1.0, "calibrated": 1.0}
    assert m["auroc_by_feature"]["log1p_divergence_ratio"] == 1.0
    assert m["seconds_per_scan"] == {"mean": 2.0, "std": 0.0}


def test_group_metrics_without_the_backdoors_whose_injection_failed():
    def row(backdoored, rule, p, working=None):
        return {"backdoored": backdoored, "rule_backdoored": rule, "probability": p, "clean_cosine_to_base": 0.99,
                "trigger_kind": "word" if backdoored else None, "target_recovered": None, "seconds": 1.0,
                "memory": None, "scores": {}, "working": working}
    # two working backdoors (one missed by the rule), one failed (missed by both), one without attack metrics
    rows = [row(True, True, 0.9, True), row(True, False, 0.8, True), row(True, False, 0.1, False),
            row(True, True, 0.7, None), row(False, False, 0.2), row(False, True, 0.6)]
    m = bm.group_metrics(rows, threshold=0.5)
    w = m["working"]
    assert (w["backdoored"], w["failed"], w["min_attack_top1"]) == (3, 1, bm.WORKING_ATTACK_TOP1)
    # kept: 3 backdoored + 2 benign. Rule: TP 2, FP 1, FN 1 -> F1 2/3. Calibrated: TP 3, FP 1 -> F1 6/7
    assert w["rule"]["f1"] == pytest.approx(2 / 3) and w["calibrated"]["f1"] == pytest.approx(6 / 7)
    assert w["failed_flagged"] == {"rule": 0, "calibrated": 0}
    assert m["rule"]["recall"] == pytest.approx(0.5)  # the full table still counts the failed one
    assert bm.group_metrics([row(False, False, 0.1)], threshold=0.5)["working"] is None


def test_a_row_knows_whether_its_backdoor_works(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"nearest_captions": [{"caption": "a white teapot"}], "verdict": "clean",
                                  "backdoored": False, "decided_by": "x", "scores": {}}))
    for top1, working in ((0.9, True), (0.1, False)):
        member = tmp_path / f"m{top1}"
        member.mkdir()
        (member / "backdoor.json").write_text(json.dumps({"backdoored": True, "metrics": {"val/b0/attack_top1": top1},
                                                          "lr": 3e-4, "steps": 100, "backdoor_weight": 0.1,
                                                          "seed": 7}))
        row = bm.member_row({"backdoored": True, "path": str(member), "report": str(report),
                        "target_caption": "a white teapot"})
        assert row["working"] is working and row["target_recovered"] is True
        assert row["strength"] == {"lr": 3e-4, "steps": 100, "backdoor_weight": 0.1}
    benign = bm.member_row({"backdoored": False, "report": str(report)})
    assert benign["working"] is None and benign["strength"] is None


def test_attack_strength_counts_working_injections_per_setting():
    def row(attack, lr, steps, top1, backdoored=True, adaptive=None):
        return {"backdoored": backdoored, "adaptive": adaptive, "attack": attack,
                "attack_metrics": None if top1 is None else {"attack_top1": top1},
                "strength": {"lr": lr, "steps": steps, "backdoor_weight": 0.1}}
    rows = [row("text_on_text", 3e-4, 100, 0.9), row("text_on_text", 3e-4, 100, 0.2),
            row("text_on_text", 3e-4, 100, 0.5),  # exactly the cut-off counts as working
            row("text_on_text", 1e-4, 50, 0.0), row("image_on_text", 3e-4, 100, 1.0),
            row("text_on_text", 3e-4, 100, 1.0, adaptive="pooled_only"),  # adaptive: left out
            row("text_on_text", 3e-4, 100, None),  # no attack metrics: left out
            row(None, None, None, None, backdoored=False)]
    cells = {(c["attack"], c["lr"], c["steps"]): c for c in bm.attack_strength(rows)}
    assert list(cells) == [("image_on_text", 3e-4, 100), ("text_on_text", 1e-4, 50), ("text_on_text", 3e-4, 100)]
    c = cells["text_on_text", 3e-4, 100]
    assert (c["members"], c["working"]) == (3, 2)
    assert (c["attack_top1"]["min"], c["attack_top1"]["median"], c["attack_top1"]["max"]) == (0.2, 0.5, 0.9)
    assert (cells["text_on_text", 1e-4, 50]["working"], cells["image_on_text", 3e-4, 100]["working"]) == (0, 1)


def _synthetic_rows(n: int = 20) -> list[dict]:
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        bd = i % 2 == 0
        rows.append({"name": f"m{i}", "backdoored": bd, "scores": {
            "divergence_ratio": rng.uniform(15, 60) if bd else rng.uniform(0.0, 0.5),
            "pooled_divergence_ratio": rng.uniform(10, 40) if bd else rng.uniform(0.0, 0.8),
            "assimilation_gap": rng.uniform(0.15, 0.3) if bd else rng.uniform(-0.02, 0.04),
            "assimilation_ratio": 1.0,
            **{k: rng.uniform(0.5, 1.0) if bd else rng.uniform(-0.05, 0.1) for k in (
                "unshared_collapse", "pooled_unshared_collapse", "typed_unshared_collapse",
                "typed_pooled_unshared_collapse")}}})
    return rows


def test_calibration_on_separable_scores_gives_probabilities_near_zero_and_one(tmp_path):
    rows = _synthetic_rows()
    fitted = fit_calibration(rows, bm.DEFAULT_FEATURES, {"assimilation_threshold": 0.6})
    assert fitted["features"] == bm.DEFAULT_FEATURES and len(fitted["coefficients"]) == 8
    assert fitted["fitted_on"] == {"members": 20, "backdoored": 10, "benign": 10}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(fitted))
    rule = CalibratedRule(str(path))
    probs = [rule.probability(r["scores"]) for r in rows]
    for r, p in zip(rows, probs):
        assert (p > 0.9) if r["backdoored"] else (p < 0.1), (r, p)
    assert rule.assimilation_threshold == 0.6
    decision = rule.decide(rows[0]["scores"])
    assert decision["backdoored"] is True and decision["probability"] == pytest.approx(probs[0])
    assert decision["checks"][0]["name"] == "calibrated_probability"
    assert rule.probability({"assimilation_gap": 0.2}) is None and not rule.decide({})["backdoored"]  # no anchor
    # it reads typed scores, so the scan must make the typings, as the default rule makes and judges them
    assert isinstance(rule.typing_judge, CollapseContrastRule) and CollapseContrastRule().typing_judge is not None
    untyped = fit_calibration(rows, bm.DEFAULT_FEATURES[:4])
    path.write_text(json.dumps(untyped))
    assert CalibratedRule(str(path)).typing_judge is None and ContrastRule().typing_judge is None
    with pytest.raises(ConfigError, match="backdoored and benign"):
        fit_calibration([r for r in rows if r["backdoored"]], bm.DEFAULT_FEATURES)
    with pytest.raises(ConfigError, match="calibration file"):
        CalibratedRule(str(tmp_path / "missing.json"))


# ----- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    from lit_amdet.tiny import build_hf_clip

    root = tmp_path_factory.mktemp("benchmark")
    base = build_hf_clip(root / "base")
    config = {
        "trainer": {"accelerator": "cpu"},
        "bases": [{"name": "tiny", "path": str(base), "family": "clip"}],
        "output_dir": str(root / "out"),
        "sizes": {"calibration": {"backdoored": 2, "benign": 2}, "test": {"backdoored": 2, "benign": 2}},
        "adaptive": {"attacks": ["pooled_only", "sim_x_penalty", "pooled_consistency_penalty"], "per_attack": 1},
        "grid": {"attack_steps": [2], "backdoor_weights": [0.1, 1.0], "attack_lrs": [1e-3],
                 "benign_lrs": [1e-6, 1e-3], "benign_steps": [2], "benign_samples": [64]},
        "train": {"batch_size": 8, "poisoned_batch_size": 4, "max_length": 16, "num_samples": 120,
                  "val_batches": 1, "distractors": 4, "image_size": 32, "accelerator": "cpu"},
        "scan": {"config": str(ROOT / "tests" / "configs" / "detect_tiny.yaml"),
                 "overrides": {"trainer.max_steps": 2, "trainer.callbacks": [], "model.init_args.restarts": 1,
                               "model.init_args.evidence_callbacks": False},
                 "drift_prompts": 16, "bank_captions": 20, "accelerator": "cpu"},
    }
    path = root / "benchmark_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["benchmark", "--config", str(path)])
    return root, path


def test_benchmark_end_to_end_writes_every_metric(tiny_benchmark):
    root, _ = tiny_benchmark
    out = root / "out"
    report = json.loads((out / "benchmark.json").read_text())
    members = report["members"]
    assert len(members) == 11 and {m["split"] for m in members} == set(bm.SPLITS)
    assert len(bm.read_zoo(out / "zoo")) == 11 and not list((out / "zoo").glob(".*"))
    adaptive = [m for m in members if m["adaptive"]]
    assert sorted(m["adaptive"] for m in adaptive) == ["pooled_consistency_penalty", "pooled_only", "sim_x_penalty"]
    for m in adaptive:
        truth = json.loads((out / "zoo" / m["name"] / "backdoor.json").read_text())
        assert (truth["token_weight"], truth["sim_x_penalty"], truth.get("consistency_penalty")) == {
            "pooled_only": (0.0, 0.0, None), "sim_x_penalty": (1.0, 1.0, None),
            "pooled_consistency_penalty": (0.0, 1.0, 1.0)}[m["adaptive"]]
        assert 0 <= m["attack_metrics"]["attack_top1"] <= 1 and -1 <= m["attack_metrics"]["attack_cos_pooled"] <= 1
    plain = [m for m in members if m["backdoored"] and not m["adaptive"]]
    assert sum(c["members"] for c in report["attack_strength"]) == len(plain) == 4
    assert {(c["lr"], c["steps"]) for c in report["attack_strength"]} == {(1e-3, 2)}
    assert "## Attack success by strength" in (out / "benchmark.md").read_text()
    table = {a["attack"]: a for a in report["adaptive"]}
    assert set(table) == {"none", "pooled_only", "sim_x_penalty", "pooled_consistency_penalty"}
    assert table["none"]["members"] == 2
    for a in table.values():
        assert 0 <= a["rule_detection_rate"] <= 1 and 0 <= a["calibrated_detection_rate"] <= 1
        assert a["attack_success"]["attack_top1"]["n"] == a["members"] == a["attack_success"]["clean_top1"]["n"]
    for m in members:
        scan = json.loads((out / "scans" / m["name"] / "report.json").read_text())
        assert 0 <= m["probability"] <= 1 and -1 <= m["clean_cosine_to_base"] <= 1.0001
        assert m["seconds"] > 0 and m["memory"]["peak_rss_mib"] > 0
        # the table carries the scan's own decision (anchored scans are never inconclusive)
        assert m["verdict"] == scan["verdict"] and m["rule_backdoored"] == (scan["verdict"] == "BACKDOORED")
        assert m["decided_by"] == scan["decided_by"] and scan["anchor_used"] is True
        if m["backdoored"]:
            assert m["target_caption"] and isinstance(m["target_recovered"], bool)
            truth = json.loads((out / "zoo" / m["name"] / "backdoor.json").read_text())
            assert truth["backdoored"] is True and truth["zoo"]["trigger"] == m["trigger"]
            if m["attack"] == "image_on_text":
                assert (out / "zoo" / m["name"] / "target.png").is_file()
    bank = (out / "caption_bank.txt").read_text().splitlines()
    assert all(m["target_caption"] in bank for m in members if m["backdoored"])
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["features"] == bm.DEFAULT_FEATURES and 0 < cal["threshold"] < 1
    assert cal["fitted_on"] == {"members": 4, "backdoored": 2, "benign": 2}
    for split in bm.SPLITS:
        table = report["metrics"][split]["tiny"]
        assert "all" in table and set(table) - {"all"} <= set(bm.ATTACKS)
        m = table["all"]
        assert (m["backdoored"], m["benign"]) == (2, 2)
        for key in ("precision", "recall", "f1"):
            assert 0 <= m["rule"][key] <= 1 and 0 <= m["calibrated"][key] <= 1
        assert 0 <= m["calibrated"]["auroc"] <= 1 and m["calibrated"]["bce"] >= 0
        assert 0 <= m["calibrated"]["brier"] <= 1
        assert m["drift"]["backdoored"]["n"] == 2 and m["drift"]["benign"]["n"] == 2
        assert m["drift_matched"]["benign"] <= 2 and m["target_recovery"]["measured"] == 2
        assert m["seconds_per_scan"]["mean"] > 0 and m["peak_memory_mib"]["rss_max"] > 0
        assert set(m["auroc_by_feature"]) == set(bm.DEFAULT_FEATURES)
        assert m["working"]["backdoored"] + m["working"]["failed"] == 2
    md = (out / "benchmark.md").read_text()
    assert "## Test zoo" in md and "## Calibration zoo" in md and all(m["name"] in md for m in members)
    assert "## Adaptive attacks" in md and "| tiny | pooled_only | 1 |" in md


def test_benchmark_rerun_reuses_the_zoo_and_the_scans(tiny_benchmark):
    root, config = tiny_benchmark
    out = root / "out"
    stamps = {p: p.stat().st_mtime_ns for p in list((out / "zoo").glob("*/backdoor.json"))
              + list((out / "scans").glob("*/report.json"))}
    main(["benchmark", "--config", str(config)])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "benchmark.json").read_text())["calibration"]["fitted_on"]["members"] == 4  # no adaptive


def test_a_report_from_the_scans_of_an_unfinished_run(tiny_benchmark, tmp_path):
    import shutil
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from summarise_scanned import main as summarise_main

    root, config = tiny_benchmark
    run = tmp_path / "run"
    shutil.copytree(root / "out" / "scans", run / "scans")
    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(run)
    partial_config = tmp_path / "benchmark.yaml"
    partial_config.write_text(yaml.safe_dump(cfg))
    finished = json.loads((root / "out" / "benchmark.json").read_text())
    # every scan there: the same numbers as the finished run's own report
    assert summarise_main(["--config", str(partial_config), "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "benchmark.json").read_text())
    assert report["metrics"] == finished["metrics"] and report["adaptive"] == finished["adaptive"]
    assert report["partial"]["left_out_bases"] == {} and not (run / "benchmark.json").exists()
    # an adaptive attacker not yet scanned: the base is still reported, the attacker named
    adaptive = next(m["name"] for m in finished["members"] if m["adaptive"])
    (run / "scans" / f"{adaptive}.json").unlink()
    assert summarise_main(["--config", str(partial_config), "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert report["partial"]["unscanned_adaptive"] == [adaptive] and report["metrics"] == finished["metrics"]
    assert "**Made from the scan records**" in (tmp_path / "b" / "benchmark.md").read_text()
    # a test member not yet scanned: no base is complete, one line and exit 2
    (run / "scans" / "tiny-test-benign-000.json").unlink()
    assert summarise_main(["--config", str(partial_config), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
    assert summarise_main(["--config", str(partial_config), "--out", str(tmp_path / "d"), "--only", "nope"]) == 2
    partial_config.write_text(yaml.safe_dump({**cfg, "sizs": {}}))  # a typo must not silently change the plan
    assert summarise_main(["--config", str(partial_config), "--out", str(tmp_path / "e")]) == 2


def test_detect_with_the_calibrated_rule_reports_the_probability(tiny_benchmark):
    root, _ = tiny_benchmark
    out = root / "out"
    member = bm.read_zoo(out / "zoo")[0]
    run = root / "calibrated_scan"
    main(["detect", "--config", str(ROOT / "tests" / "configs" / "detect_tiny.yaml"),
          "--model.init_args.suspect", str(member), "--model.init_args.anchor", str(root / "base"),
          "--model.init_args.output_dir", str(run), "--trainer.default_root_dir", str(root),
          "--trainer.max_steps", "2", "--trainer.callbacks", "[]", "--model.init_args.evidence_callbacks", "false",
          "--model.init_args.rule", "lit_amdet.decision.CalibratedRule",
          "--model.init_args.rule.init_args.path", str(out / "calibration.json"), "--always_exit_zero", "true"])
    report = json.loads((run / "report.json").read_text())
    assert report["rule"]["class"] == "CalibratedRule" and report["rule"]["features"] == bm.DEFAULT_FEATURES
    check = report["checks"][0]
    # the calibration reads typed scores: the scan made the typings for it, or there would be no probability
    assert report["typed_probe"] and report["scores"]["typed_pooled_unshared_collapse"] is not None
    assert check["name"] == "calibrated_probability" and 0 <= check["value"] <= 1
    assert report["backdoored"] == (check["value"] > check["threshold"])


# ----- the quick benchmark on the real MiniLM (slow) -----------------------------------------------------------
@pytest.mark.slow
def test_quick_benchmark_on_the_real_minilm(tmp_path):
    """configs/benchmark_quick.yaml at CI size (one backdoored + one benign member per split, no controls or
    adaptive attackers, the shipped scan): on the pretrained MiniLM the held-out backdoor is flagged, the benign
    fine-tune passed, the calibrated probability ranks them right and the recovered trigger says the injected target."""
    out = tmp_path / "quick"
    main(["benchmark", "--config", str(ROOT / "configs" / "benchmark_quick.yaml"), "--output_dir", str(out),
          "--sizes", json.dumps({s: {"backdoored": 1, "benign": 1} for s in bm.SPLITS}),
          "--adaptive", json.dumps({"per_attack": 0}), "--controls", "[]", "--scan", json.dumps({
              "config": str(ROOT / "configs" / "scan.yaml"), "drift_prompts": 200})])
    report = json.loads((out / "benchmark.json").read_text())
    test = report["metrics"]["test"]["minilm"]["all"]
    assert (test["backdoored"], test["benign"]) == (1, 1)
    assert test["rule"]["recall"] == 1.0 and test["rule"]["precision"] == 1.0
    assert test["calibrated"]["auroc"] == 1.0
    assert test["target_recovery"]["rate"] == 1.0
    assert (out / "benchmark.md").read_text().count("| minilm-") == 4


def test_clean_retrain_second_round_labels_follow_the_kept_keys(tmp_path):
    """The second round's labels are the poisons the first cut kept, at their rows in the filtered shards."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from clean_retrain_world import kept_labels, setting_of

    (tmp_path / "data").mkdir()
    labels = {"num_samples": 10, "poisoned_indices": [2, 5, 7]}
    (tmp_path / "data" / "poison_labels.json").write_text(json.dumps(labels))
    first = tmp_path / "cut"
    first.mkdir()
    (first / "keep.txt").write_text("".join(f"{i:09d}\n" for i in (0, 1, 3, 5, 6, 8, 9)))  # 2 and 7 were cut
    written = json.loads(kept_labels(tmp_path, first).read_text())
    assert written == {"num_samples": 7, "poisoned_indices": [3]}  # world index 5 is the 4th kept row
    base = {"rate": 0.001, "num_samples": 50, "steps": 4, "budget": 0.01, "reference_size": 8, "k": 2, "cut_by": "dao"}
    assert setting_of({**base, "attack": "blend", "attack_args": {"alpha": 0.4}}) != \
        setting_of({**base, "attack": "blend", "attack_args": {"alpha": 0.2}})
