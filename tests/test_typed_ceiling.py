"""`benchmarks/typed_ceiling.py` reads every typing of a scan's report (not only the one its scores keep) and judges
the report again with the search's typed pooled lift and the shipped one.

    .venv/bin/python -m pytest -q tests/test_typed_ceiling.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import typed_ceiling  # noqa: E402

from tests.stored_scans import write_scan  # noqa: E402

SEARCH = {"anchor_used": True, "assimilation_ratio": 1.0, "same_target_ratio": 0.9, "clean_anchor_pooled_cos": 0.99,
          "unshared_collapse": -0.5, "collapse_lift": -0.5, "assimilation_gap": -0.01, "anchor_cos": 0.995,
          "clean_anchor_cos": 0.998, "anchor_pooled_cos": 0.997, "pooled_collapse_lift": 0.98,
          "anchor_pooled_collapse_lift": 0.98, "pooled_unshared_collapse": 0.0}


def typing(token: str, pooled: float, lift: float, unshared: float = 0.0) -> dict:
    return {"token": token, "ids": [1], "by": "rows", "position": 1, "moved": 0.3, "precision": "float32",
            "unshared_collapse": unshared, "collapse_lift": unshared + 0.01, "anchor_collapse_lift": 0.0,
            "pooled_unshared_collapse": pooled, "pooled_collapse_lift": lift, "anchor_pooled_collapse_lift": 0.0}


def scan(folder: Path, name: str, backdoored: bool, typings: list[dict]) -> None:
    write_scan(folder, name, backdoored, SEARCH, typings)


def test_every_typing_is_read_and_judged_under_both_lifts(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    # the second typing (not the one the scores keep) collapses the sentence embeddings at lift 0.73
    scan(scans, "b", True, [typing("to", 0.01, 0.02), typing("just saying", 0.72, 0.73)])
    scan(scans, "c", False, [typing("white", 0.21, 0.44, unshared=0.1), typing("two", 0.05, 0.9)])
    out = tmp_path / "out.json"
    sys.argv = ["typed_ceiling.py", str(scans), "--out", str(out)]
    typed_ceiling.main()
    rows = {r["name"]: r for r in json.loads(out.read_text())["members"]}
    assert rows["b"]["reach"]["pooled"] == 0.72 and rows["b"]["reach"]["pooled_token"] == "just saying"
    assert (rows["b"]["old_verdict"], rows["b"]["new_verdict"]) == ("clean", "BACKDOORED")
    assert rows["c"]["reach"]["pooled"] == 0.21 and rows["c"]["reach"]["token"] == 0.1
    assert rows["c"]["old_verdict"] == rows["c"]["new_verdict"] == "clean"
