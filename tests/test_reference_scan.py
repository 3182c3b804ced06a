"""The speed baseline `benchmarks/reference_scan.py` (issue 6, item 6) does what the public reference does.

    .venv/bin/python -m pytest -q tests/test_reference_scan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_scan  # noqa: E402

PROMPTS = ["a red circle on a blue background", "two green squares", "a small yellow star above a triangle",
           "three purple rings", "a striped orange heart", "an empty gray canvas", "a large black hexagon",
           "a pink crescent moon next to a cross", "four tiny white dots", "a dotted teal pentagon"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """One tiny random CLIP text tower (width 32, 2 layers): the procedure, not a detection, is under test."""
    from lit_amdet.tiny import build_hf_clip

    return str(build_hf_clip(tmp_path_factory.mktemp("reference_scan") / "clip", arch="CLIPTextModel"))


def test_scan_writes_two_feature_files_per_prompt_and_a_verdict(tiny_clip, tmp_path):
    model = tiny_clip
    result = reference_scan.reference_scan(model, model, PROMPTS, tmp_path, max_length=16, grid=5, epochs=1)
    for folder in ("HiddenStates", "OriginalFeature"):
        names = sorted(p.name for p in (tmp_path / "Features" / folder).iterdir())
        assert names == [f"{i:06d}.npy" for i in range(len(PROMPTS))]
        shape = np.load(tmp_path / "Features" / folder / names[0]).shape
        assert shape[:2] == (1, 16)  # batch 1, padded to max_length
    assert result["feature_files"] == 2 * len(PROMPTS)
    assert result["prompts"] == {"search": 8, "held_out": 2}  # the reference's 80/20 cut
    assert result["steps"] == 1  # 8 search prompts, batch 10, one epoch
    assert result["verdict"] in ("BACKDOORED", "clean") and result["backdoored"] == (result["verdict"] == "BACKDOORED")
    assert (tmp_path / "Results" / "log.txt").is_file()
    assert (tmp_path / "Results" / "Backdoor_Embedding_init.pt").is_file()


def test_landscape_is_one_grid_of_single_prompt_losses(tiny_clip, tmp_path):
    from lit_amdet.encoders import load_encoder

    model = tiny_clip
    suspect = load_encoder(model).eval()
    tokens = reference_scan.write_feature_files(suspect, PROMPTS, 16, tmp_path / "Features")
    loader = torch.utils.data.DataLoader(reference_scan.ReferenceFeatures(tmp_path / "Features", "test"), batch_size=1)
    assert len(loader) == 2
    scan = reference_scan.ReferenceScan(suspect, suspect, tokens)
    surface = scan.landscape(torch.randn(1, suspect.width), loader, grid=5)
    assert surface.shape == (5, 5) and np.isfinite(surface).all()


def test_hessian_ignores_grid_spacing_like_the_reference():
    # L = 3a² + b² has Hessian diag(6, 2); finite differences without dividing by h² give 6h² and 2h²
    axis = np.linspace(-10, 10, 5)
    h = axis[1] - axis[0]
    a, b = np.meshgrid(axis, axis, indexing="ij")
    eig = reference_scan.hessian_eigenvalues(3 * a ** 2 + b ** 2).reshape(-1, 2)
    assert eig.shape == (9, 2)  # interior points only
    np.testing.assert_allclose(eig, np.tile([2 * h ** 2, 6 * h ** 2], (9, 1)))
    assert reference_scan.positive_ratio(eig.ravel()) == 1.0
    # a saddle: half the eigenvalues are negative
    assert reference_scan.positive_ratio(reference_scan.hessian_eigenvalues(a ** 2 - b ** 2)) == pytest.approx(0.5)


def test_assimilation_loop_counts_every_position():
    f = torch.zeros(1, 3, 4)
    f[0, :2, 0] = 1.0  # two identical tokens
    f[0, 2, 1] = 1.0  # one orthogonal token
    # full 3 x 3 cosine matrix, diagonal included: (3 ones on the diagonal + 2 off-diagonal ones) / 9
    assert reference_scan.assimilation_loop(f).item() == pytest.approx(5 / 9)


def test_speed_compares_a_baseline_checkout_by_its_median_run():
    """`benchmarks/speed.py --baseline-tree`: each side counts its median run, the gain is baseline / ours."""
    import speed

    runs = [{"wall_s": 12.0, "verdict": "clean", "peak_rss_mib": 5.0}, {"wall_s": 10.0, "verdict": "clean",
            "peak_rss_mib": 7.0}, {"wall_s": 30.0, "verdict": "clean", "peak_rss_mib": 6.0}]
    assert speed.median_run(runs)["wall_s"] == 12.0 and speed.median_run(runs)["wall_runs_s"] == [12.0, 10.0, 30.0]
    assert speed.median_run(runs)["peak_rss_runs_mib"] == [5.0, 7.0, 6.0]  # the highest is not the median run's
    assert speed.median_run(runs[:2])["wall_s"] == 10.0  # the lower middle of an even count
    rows = [{"model": f"zoo/m{i}", "name": f"m{i}", "truth_backdoored": b,
             "ours": {"backdoored": b, "verdict": v, "wall_s": o, "steps": 10, "peak_rss_mib": 1.0},
             "baseline": {"verdict": v, "wall_s": w}, "gain": w / o}
            for i, (b, v, o, w) in enumerate(((True, "BACKDOORED", 10.0, 12.0), (False, "clean", 10.0, 10.0),
                                              (False, "clean", 8.0, 12.0)))]
    s = speed.summarise(rows)
    assert s["gain_median"] == pytest.approx(1.2) and s["gain_min"] == 1.0 and s["gain_max"] == 1.5
    assert s["same_verdicts"] == 3 and s["ours_correct"] == 3 and "speedup_median" not in s
    assert "| m0 (backdoored) | 12.0 | BACKDOORED | 10.0 | BACKDOORED | 10 | 1.20 | 1 |" in speed.table(rows)


def test_speed_reports_the_warm_cache_beside_the_cold_runs():
    """`benchmarks/speed.py --warm`: the goal is judged on the cold runs; the warm ones get ratios of their own."""
    import speed

    rows = [{"model": f"zoo/m{i}", "name": f"m{i}", "truth_backdoored": b,
             "reference": {"backdoored": False, "verdict": "clean", "wall_s": ref},
             "ours": {"backdoored": b, "verdict": v, "wall_s": cold, "steps": 10, "peak_rss_mib": 1.0},
             "ours_warm": {"backdoored": b, "verdict": v, "wall_s": warm}, "speedup": ref / cold,
             "speedup_warm": ref / warm}
            for i, (b, v, ref, cold, warm) in enumerate(((True, "BACKDOORED", 100.0, 20.0, 20.0),
                                                         (False, "clean", 100.0, 40.0, 10.0)))]
    s = speed.summarise(rows)
    assert s["speedup_median"] == pytest.approx(3.75) and s["goal_met"] is False  # the cold runs decide
    assert s["speedup_warm_median"] == pytest.approx(7.5) and s["speedup_warm_min"] == 5.0
    assert s["ours_warm_correct"] == 2 and s["reference_correct"] == 1
    assert "| m1 (benign) | 100.0 | clean | 40.0 | clean | 10 | 2.50 | 1 | 10.0 | 10.00 |" in speed.table(rows)


def test_a_childs_peak_memory_is_its_own_not_the_parents(tmp_path):
    """Linux starts a child's ``ru_maxrss`` at what its parent held, so ``wait4`` on a child of a process that had
    built a 1.7 GB model reported the builder's 2,390 MiB (session 2026-12-07 (l)). `run_child` reads the child's
    own peak: a child that touches 64 MiB reports under 150 MiB however large this test process has grown (torch
    imported, and 256 MiB more held while the child runs)."""
    ballast = torch.ones(2**28, dtype=torch.uint8)
    child = "b = bytearray(2**26)\nfor i in range(0, len(b), 4096): b[i] = 1"
    measured = reference_scan.run_child(["-c", child], tmp_path / "child.log")
    assert int(ballast[-1]) == 1
    if measured["peak_rss_source"] == "time":
        assert 64 < measured["peak_rss_mib"] < 150, measured
    assert not list(tmp_path.glob("*.peak"))
