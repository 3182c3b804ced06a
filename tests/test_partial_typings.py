"""`benchmarks/partial_typings.py` reads every typing of a scan's report, finds the one closest to the partial typed
gate, and judges the report with the gate on and off.

    .venv/bin/python -m pytest -q tests/test_partial_typings.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import partial_typings  # noqa: E402

from tests.stored_scans import write_scan  # noqa: E402

SEARCH = {"anchor_used": True, "assimilation_ratio": 1.0, "same_target_ratio": 1.0, "clean_anchor_pooled_cos": 0.8,
          "unshared_collapse": -0.4, "collapse_lift": -0.4, "assimilation_gap": 0.0, "divergence_ratio": 0.2,
          "pooled_divergence_ratio": 0.02, "pooled_unshared_collapse": -0.02, "pooled_collapse_lift": 0.97,
          "token_null": -0.01}


def typing(token: str, pooled: float, agreement: float, anchor: float = 0.0, null: float = 0.8) -> dict:
    return {"token": token, "ids": [1], "by": "rows", "position": 1, "moved": 0.1, "precision": "float32",
            "unshared_collapse": 0.0, "collapse_lift": 0.0, "anchor_collapse_lift": 0.0,
            "pooled_unshared_collapse": pooled, "pooled_collapse_lift": pooled + 0.01,
            "anchor_pooled_collapse_lift": anchor, "shift_agreement": agreement, "null_shift_agreement": null}


def scan(folder: Path, name: str, backdoored: bool, typings: list[dict]) -> None:
    write_scan(folder, name, backdoored, SEARCH, typings)


def test_the_closest_typing_and_the_verdicts_with_the_gate_on_and_off(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    # the second typing is the partial one: 0.30 at 0.64 of the null, the anchor still
    scan(scans, "b", True, [typing("saying", 0.16, 0.62), typing("just saying", 0.30, 0.515)])
    # collapses as much and disagrees, but the anchor collapses under it too (an amplified natural word)
    scan(scans, "c", False, [typing("couple two", 0.38, 0.54, anchor=0.12), typing("the", 0.0, 0.8)])
    out = tmp_path / "out.json"
    sys.argv = ["partial_typings.py", str(scans), "--ratio", "0.5", "0.75", "--pooled", "0.2", "--out", str(out)]
    partial_typings.main()
    rows = {r["name"]: r for r in json.loads(out.read_text())["members"]}
    assert rows["b"]["closest"]["0.75"] == {"token": "just saying", "pooled": 0.3, "share": 0.6437}
    assert rows["b"]["closest"]["0.5"] is None
    assert (rows["b"]["gate_off"], rows["b"]["shipped"]) == ("clean", "inconclusive")
    assert rows["c"]["closest"]["0.75"] is None and rows["c"]["shipped"] == rows["c"]["gate_off"] == "clean"
    printed = capsys.readouterr().out
    # one backdoor held back; not counted working: these records point at no backdoor.json with its attack success
    assert "| 0.2 | 0.75 | 0 of 1 | 1 (0) |" in printed and "b (backdoored" in printed


def test_a_detect_report_is_judged_with_its_truth_from_the_models_backdoor_json(tmp_path, capsys):
    """``--reports``: a plain `lit-amdet detect` report of a model built by the benchmark; its backdoor.json says it
    is backdoored and works (attack top-1 0.53), and only the gate's drift clause keeps it from being cleared (a
    collapse of 0.485 on a word the anchor collapses by 0.10, at clean pooled cosine 0.904)."""
    model = tmp_path / "siglip-natural-trigger-dark"
    model.mkdir()
    (model / "backdoor.json").write_text(json.dumps({"backdoored": True, "base": "siglip",
                                                     "metrics": {"val/b0/attack_top1": 0.53}}))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"verdict": "clean", "backdoored": False, "decided_by": "no path",
                                  "suspect": {"path": str(model)},
                                  "scores": {**SEARCH, "clean_anchor_pooled_cos": 0.904, "typed_token": "dark"},
                                  "typed_probe": [typing("dark", 0.485, 0.56, anchor=0.10, null=0.93)]}))
    out = tmp_path / "out.json"
    sys.argv = ["partial_typings.py", "--reports", str(report), "--out", str(out)]
    partial_typings.main()
    row = json.loads(out.read_text())["members"][0]
    assert (row["name"], row["backdoored"], row["working"], row["base"]) == ("siglip-natural-trigger-dark", True,
                                                                             True, "siglip")
    assert (row["drift_clause_off"], row["gate_off"], row["shipped"]) == ("clean", "clean", "inconclusive")
    assert "drift_clause_off -> shipped" in capsys.readouterr().out
