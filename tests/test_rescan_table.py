"""`benchmarks/rescan_table.py` compares two benchmark runs member by member: only the same plan counts as the same
member, ``--bases`` restricts each pair to the bases its new run holds, and adaptive attacks are counted per verdict.

    .venv/bin/python -m pytest -q tests/test_rescan_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rescan_table  # noqa: E402

SCORES = {"unshared_collapse": 0.7, "collapse_lift": 0.7, "pooled_unshared_collapse": 0.1, "pooled_collapse_lift": 0.1,
          "clean_anchor_pooled_cos": 0.99, "anchor_used": True}


def member(name: str, base: str, verdict: str, backdoored: bool = True, adaptive: str | None = None,
           trigger: str = "cf", working: bool = True, split: str = "test") -> dict:
    return {"name": name, "base": base, "split": split, "backdoored": backdoored, "attack": "text_on_text",
            "adaptive": adaptive, "trigger": trigger if backdoored else None, "target_caption": "a cat",
            "verdict": verdict, "working": working if backdoored else None, "scan_seconds": 1.0,
            "report": "/nonexistent/report.json", "decided_by": "token collapse",
            "scores": dict(SCORES) if backdoored else {**SCORES, "unshared_collapse": 0.0, "collapse_lift": 0.0}}


def report(members: list[dict]) -> dict:
    bases = sorted({m["base"] for m in members})
    group = {"backdoored": 1, "benign": 1, "rule": {"f1": 1.0}, "working": {"rule": {"f1": 1.0}},
             "calibrated": {"auroc": 1.0, "bce": 0.1, "brier": 0.01}}
    return {"members": members, "metrics": {"test": {b: {"all": group} for b in bases + ["all"]}}}


def write(folder: Path, members: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "benchmark.json").write_text(json.dumps(report(members)))
    return folder


@pytest.fixture
def runs(tmp_path):
    old = write(tmp_path / "old", [
        member("a-test-backdoored-000", "a", "clean"), member("a-test-benign-000", "a", "clean", backdoored=False),
        member("b-test-backdoored-000", "b", "clean"), member("b-test-benign-000", "b", "clean", backdoored=False),
        member("a-adaptive-pooled-only-000", "a", "clean", adaptive="pooled_only", trigger="xx")])
    new = write(tmp_path / "new", [
        member("a-test-backdoored-000", "a", "BACKDOORED"), member("a-test-benign-000", "a", "clean", backdoored=False),
        # the same name, another draw: the attack drew more members, so its first one is a different model
        member("a-adaptive-pooled-only-000", "a", "BACKDOORED", adaptive="pooled_only", trigger="qq"),
        member("a-adaptive-pooled-only-001", "a", "inconclusive", adaptive="pooled_only", trigger="zz"),
        member("a-adaptive-pooled-only-002", "a", "BACKDOORED", adaptive="pooled_only", trigger="vv", working=False)])
    return old, new


def test_one_base_rescanned_is_compared_on_that_base_and_a_new_draw_is_no_changed_verdict(runs, tmp_path):
    old, new = runs
    out = tmp_path / "table.json"
    rescan_table.main(["--pair", str(old), str(new), "--bases", "a", "b", "--out", str(out)])
    [result] = json.loads(out.read_text())
    assert set(result["new_rows"]) == set(result["old_rows"]) == {"test/a"}  # b: not in the new run
    assert [c["member"] for c in result["changed"]] == ["a-test-backdoored-000"]  # not the adaptive new draw
    assert result["old_adaptive"] == {"a/pooled_only": {"members": 1, "working": 1, "flagged": 0, "inconclusive": 0,
                                                        "clean": 1}}
    assert result["new_adaptive"] == {"a/pooled_only": {"members": 3, "working": 2, "flagged": 1, "inconclusive": 1,
                                                        "clean": 0}}
    assert result["old_rows"]["test/a"]["rule_progress_auroc"] == 1.0  # both runs hold collapse scores here


def test_without_bases_two_runs_over_different_zoos_are_refused(runs, tmp_path):
    old, new = runs
    with pytest.raises(SystemExit):
        rescan_table.main(["--pair", str(old), str(new), "--out", str(tmp_path / "table.json")])


def test_a_run_scanned_with_an_older_rule_has_no_rule_auroc(tmp_path):
    members = [member("a-test-backdoored-000", "a", "BACKDOORED"), member("a-test-benign-000", "a", "clean",
                                                                        backdoored=False)]
    for m in members:
        m["scores"] = {"divergence_ratio": 9.0}  # ContrastRule's scores: no collapse scores
    assert rescan_table.progress_auroc(rescan_table.CollapseContrastRule(), members) is None


def test_bases_the_new_run_does_not_hold_are_refused(runs, tmp_path):
    old, new = runs
    with pytest.raises(SystemExit):
        rescan_table.main(["--pair", str(old), str(new), "--bases", "b", "--out", str(tmp_path / "table.json")])
