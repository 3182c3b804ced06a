"""``variant="reference"`` and ``dao_form``: the published reference code's SLOF/DAO/k-dist/LID, checked against a
straightforward numpy transcription of its steps (HanxunH/Detect-CLIP-Backdoor-Samples,
``backdoor_sample_detector/{k_distance,lid_detection,slof,dao}.py``), and the DAO paper's power form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_amdet.outliers import dao_score, knn, lid_score, score_samples

NAMES = ("kdist", "lid", "slof", "dao")


def reference_code(queries: np.ndarray, refs: np.ndarray, own: np.ndarray, k: int, power: bool = False) -> dict:
    """The reference code's steps for one batch: cdist, drop the query's own column, sort, and read the sorted
    positions as rows of the references' full sorted distance matrix (self included)."""
    d = np.sqrt(((queries[:, None, :] - refs[None, :, :]) ** 2).sum(-1))
    full = np.sort(np.sqrt(((refs[:, None, :] - refs[None, :, :]) ** 2).sum(-1)), axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        full_lids = -k / np.sum(np.log(full[:, :k] / full[:, k][:, None] + 1e-4), axis=1)
        out = {name: np.empty(len(queries)) for name in NAMES}
        for i in range(len(queries)):
            row = d[i] if own[i] < 0 else np.delete(d[i], own[i])
            idx = np.argsort(row, kind="stable")
            a = row[idx]
            p = idx[:k]  # positions in the row without self, used as reference rows: the shift
            d_k = full[p, k]
            out["kdist"][i] = a[k]
            out["lid"][i] = -k / np.sum(np.log(a[:k] / a[k] + 1e-4))
            out["slof"][i] = np.mean(a[k] / d_k)
            out["dao"][i] = np.mean((a[k] / d_k) ** full_lids[p] if power else full_lids[p] * np.log(a[k] / d_k))
    return {name: np.nan_to_num(v, nan=1000.0, posinf=1000.0, neginf=0.0) for name, v in out.items()}


def integer_data(seed: int = 0) -> np.ndarray:
    """Small-integer points: exact distances, many ties, and 20 identical points (a_{k+1} = 0 for k < 19)."""
    x = np.random.default_rng(seed).integers(0, 3, size=(70, 3)).astype(np.float64)
    return np.concatenate([x, np.full((20, 3), 7.0)])


@pytest.mark.parametrize("power", [False, True])
@pytest.mark.parametrize(("data", "k"), [("random", 4), ("random", 16), ("integer", 3), ("integer", 16)])
def test_whole_set_matches_the_reference_code(data, k, power):
    x = np.random.default_rng(1).normal(size=(60, 5)) if data == "random" else integer_data()
    got = score_samples(torch.from_numpy(x), NAMES, k, chunk_size=13, variant="reference",
                        dao_form="power" if power else "log")
    want = reference_code(x, x, np.arange(len(x)), k, power)
    for name in NAMES:
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    if data == "integer" and k == 16:  # the duplicate group: 0 / 0 in the code, 1000 after its nan_to_num
        assert (got["slof"][-20:] == 1000).all() and (got["lid"][-20:] == 1000).all()


def test_subsampled_references_match_the_reference_code_per_draw():
    x = np.random.default_rng(2).normal(size=(50, 4))
    got = score_samples(torch.from_numpy(x), NAMES, 4, reference_size=20, reference_draws=3, seed=5,
                        variant="reference")
    g = torch.Generator().manual_seed(5)
    want = {name: np.zeros(len(x)) for name in NAMES}
    for _ in range(3):  # the same draws; a query outside the subsample has no own column to drop
        rows = torch.randperm(len(x), generator=g)[:20].numpy()
        own = np.full(len(x), -1)
        own[rows] = np.arange(20)
        for name, v in reference_code(x, x[rows], own, 4).items():
            want[name] += v / 3
    for name in NAMES:
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-9, err_msg=name)


def test_the_shift_reads_the_query_itself_as_its_first_neighbour():
    # On a line: 0, 1, 1.5, 7. Point 0's nearest is point 1, at position 0 of its row without self; the code
    # reads row 0, point 0 itself, whose 1st-neighbour distance is 1 (point 1's is 0.5). Its own distance is
    # a_2 = 1.5, so SLOF = 1.5 / 1 in the code, 1.5 / 0.5 without the shift.
    x = torch.tensor([[0.0], [1.0], [1.5], [7.0]], dtype=torch.float64)
    got = score_samples(x, ("kdist", "slof"), 1, variant="reference")
    assert got["kdist"][0] == 1.5 and got["slof"][0] == 1.5
    exact = score_samples(x, ("kdist", "slof"), 1)
    assert exact["kdist"][0] == 1.0 and float(exact["slof"][0]) == pytest.approx(2.0)  # 1 / 0.5


def test_dao_power_form_is_the_log_of_the_dao_papers_mean():
    x = np.random.default_rng(3).normal(size=(60, 5))
    d, i = knn(torch.from_numpy(x), k=8)
    got = dao_score(d, i, form="power").numpy()
    dn, jn = d.numpy(), i.numpy()
    lid = lid_score(d).numpy()
    want = np.log(np.mean(((dn[:, -1:] + 1e-12) / (dn[jn, -1] + 1e-12)) ** lid[jn], axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # the two forms rank differently: the power form weighs the largest ratio most
    log_form = dao_score(d, i).numpy()
    assert not np.array_equal(np.argsort(got), np.argsort(log_form))


def test_power_form_stays_finite_where_the_power_overflows():
    # 17 exact duplicates and one far point: LIDs of the duplicates clamp at k / eps, far beyond float range
    x = torch.cat([torch.zeros(17, 2), torch.tensor([[5.0, 0.0]]), torch.randn(30, 2)])
    got = score_samples(x, ("dao",), 16, dao_form="power")["dao"]
    assert torch.isfinite(got).all()


def test_bad_variant_and_too_few_samples_are_value_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="variant"):
        score_samples(x, ("slof",), 3, variant="paper")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(k\+1\)-th"):
        score_samples(x, ("slof",), 9, variant="reference")
    with pytest.raises(ValueError, match=r"reference_size must be in \(5, 10\]"):
        score_samples(x, ("slof",), 4, reference_size=5, variant="reference")
