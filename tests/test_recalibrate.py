"""`benchmarks/recalibrate.py` fits the calibrated probability again from stored scans: once over the pooled
calibration members of several runs, or per run, and measures each family's test split, over all members and over
the working ones.

    .venv/bin/python -m pytest -q tests/test_recalibrate.py
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recalibrate  # noqa: E402

FEATURES = ["log1p_divergence_ratio", "typed_unshared_collapse"]


def member(rng: random.Random, i: int, base: str, split: str, backdoored: bool, working: bool = True) -> dict:
    signal = 1.0 if backdoored and working else 0.0
    return {"name": f"{base}-{split}-{i}", "base": base, "split": split, "backdoored": backdoored,
            "adaptive": None, "attack": "text_on_text", "trigger_kind": "word" if backdoored else None,
            "working": working if backdoored else None, "rule_backdoored": backdoored and working,
            "clean_cosine_to_base": 0.99, "target_recovered": None, "seconds": 1.0, "probability": 0.5,
            "scores": {"divergence_ratio": rng.uniform(0, 4) + 20 * signal,
                       "typed_unshared_collapse": rng.uniform(-0.1, 0.5) + 0.4 * signal}}


def write_run(folder: Path, base: str, seed: int) -> Path:
    rng = random.Random(seed)
    members = [member(rng, i, base, split, i % 2 == 0, working=not (split == "test" and i == 0))
               for split in ("calibration", "test") for i in range(8)]
    folder.mkdir(parents=True)
    (folder / "benchmark.json").write_text(json.dumps({"members": members}))
    return folder


def sigmoid_bce(fit: dict, rows: list[dict]) -> float:
    """Cross-entropy of the fit on ``rows``, computed here from its coefficients (not by the library)."""
    total = 0.0
    for r in rows:
        s = r["scores"]
        z = fit["intercept"] + fit["coefficients"][0] * math.log1p(s["divergence_ratio"]) \
            + fit["coefficients"][1] * s["typed_unshared_collapse"]
        p = 1 / (1 + math.exp(-z))
        total -= math.log(p if r["backdoored"] else 1 - p)
    return total / len(rows)


def test_pooled_fit_measures_each_family_on_its_test_split(tmp_path):
    runs = [write_run(tmp_path / "a", "a", 0), write_run(tmp_path / "b", "b", 1)]
    out = recalibrate.main(["--runs", *map(str, runs), "--features", *FEATURES, "--out", str(tmp_path / "o.json")])
    fit = out["fits"]["pooled"]
    assert fit["fitted_on"] == {"members": 16, "backdoored": 8, "benign": 8} and set(out["test"]) == {"a", "b"}
    assert json.loads((tmp_path / "o.json").read_text())["test"] == out["test"]
    for base, run in zip("ab", runs):
        test = [m for m in json.loads((run / "benchmark.json").read_text())["members"] if m["split"] == "test"]
        row = out["test"][base]
        assert (row["backdoored"], row["benign"]) == (4, 4)
        assert row["calibrated"]["bce"] == pytest.approx(sigmoid_bce(fit, test), rel=1e-5)
        working = [m for m in test if m["working"] is not False]
        assert row["working_backdoored"] == 3
        assert row["calibrated_working"]["bce"] == pytest.approx(sigmoid_bce(fit, working), rel=1e-5)


def test_per_run_fits_each_run_on_its_own_calibration_members(tmp_path):
    runs = [write_run(tmp_path / "a", "a", 0), write_run(tmp_path / "b", "b", 1)]
    out = recalibrate.main(["--runs", *map(str, runs), "--features", *FEATURES, "--per-run"])
    assert len(out["fits"]) == 2
    for run in runs:
        fit = out["fits"][str(run)]
        assert fit["fitted_on"]["members"] == 8
        test = [m for m in json.loads((run / "benchmark.json").read_text())["members"] if m["split"] == "test"]
        assert out["test"][run.name]["calibrated"]["bce"] == pytest.approx(sigmoid_bce(fit, test), rel=1e-5)


def test_a_member_without_a_feature_and_one_family_in_two_runs_are_errors(tmp_path):
    from lit_amdet.errors import ConfigError

    runs = [write_run(tmp_path / "a", "a", 0), write_run(tmp_path / "b", "a", 1)]
    with pytest.raises(SystemExit):  # per run, the second run's family would replace the first's rows
        recalibrate.main(["--runs", *map(str, runs), "--features", *FEATURES, "--per-run"])
    report = json.loads((runs[0] / "benchmark.json").read_text())
    del report["members"][-1]["scores"]["typed_unshared_collapse"]  # a test member scanned without the probe
    (runs[0] / "benchmark.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="a-test-7: its scan has no typed_unshared_collapse"):
        recalibrate.main(["--runs", str(runs[0]), "--features", *FEATURES])
