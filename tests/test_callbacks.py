"""The evidence callbacks against independent computations: known Hessians, finite differences, figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from lit_amdet.callbacks import HessianSpectrum, LossLandscape, hessian_extremes, loss_landscape
from lit_amdet.callbacks.landscape import hessian_2x2_eigenvalues, plane_directions


def quadratic(a: torch.Tensor):
    """Batched f(x) = 0.5 x^T A x for x of any shape (flattened): Hessian exactly A."""
    def f(xs: torch.Tensor) -> torch.Tensor:
        flat = xs.reshape(xs.shape[0], -1).to(a.dtype)
        return 0.5 * ((flat @ a) * flat).sum(1)
    return f


def symmetric(n: int, eigenvalues: np.ndarray, seed: int = 0) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return torch.tensor(q @ np.diag(eigenvalues) @ q.T, dtype=torch.float64)


@pytest.mark.parametrize("steps,radius", [(7, 1.0), (15, 0.1), (21, 3.0)])
def test_landscape_curvature_is_the_projected_hessian_for_any_grid(steps, radius):
    a = symmetric(6, np.array([5.0, 3.0, 2.0, 1.0, -0.5, -4.0]))
    center = torch.randn(2, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    d1 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    d1 /= d1.norm()
    d2 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    d2 -= (d2 * d1).sum() * d1
    d2 /= d2.norm()
    basis = torch.stack([d1.reshape(-1), d2.reshape(-1)], 1)
    expected = np.linalg.eigvalsh((basis.T @ a @ basis).numpy())
    res = loss_landscape(quadratic(a), center, d1, d2, radius, steps, chunk=10)
    eig = res["eigenvalues"].numpy()
    assert eig.shape == (steps - 2, steps - 2, 2)
    # finite differences are exact for a quadratic once divided by the spacing squared
    np.testing.assert_allclose(eig, np.broadcast_to(expected, eig.shape), rtol=1e-6, atol=1e-6)
    assert res["positive_ratio"] == pytest.approx(float((expected > 1e-6).mean()))
    # the grid values are the function itself
    assert float(res["values"][steps // 2, steps // 2]) == pytest.approx(float(quadratic(a)(center[None])[0]))


def test_landscape_separates_a_convex_basin_from_a_saddle():
    center = torch.zeros(4, dtype=torch.float64)
    d1, d2 = plane_directions(torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), seed=3)
    convex = loss_landscape(quadratic(torch.diag(torch.tensor([2.0, 1.0, 1.0, 3.0], dtype=torch.float64))),
                            center, d1, d2, 1.0, 9)
    saddle = loss_landscape(quadratic(torch.diag(torch.tensor([2.0, -1.0, -1.0, -3.0], dtype=torch.float64))),
                            center, d1, d2, 1.0, 9)
    assert convex["positive_ratio"] == 1.0
    assert saddle["positive_ratio"] == pytest.approx(0.5)  # one positive, one negative eigenvalue everywhere
    assert abs(float((d1 * d2).sum())) < 1e-12 and float(d1.norm()) == pytest.approx(1.0)
    # d1 is the descent direction
    assert float((d1 * torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)).sum()) == pytest.approx(-1.0)


def test_finite_difference_hessian_of_a_known_surface():
    h = 0.25
    c = torch.arange(-4, 5, dtype=torch.float64) * h
    a, b = torch.meshgrid(c, c, indexing="ij")
    values = 3 * a ** 2 + 2 * a * b - b ** 2  # Hessian [[6, 2], [2, -2]]
    eig = hessian_2x2_eigenvalues(values, h)
    expected = np.linalg.eigvalsh(np.array([[6.0, 2.0], [2.0, -2.0]]))
    np.testing.assert_allclose(eig.numpy(), np.broadcast_to(expected, eig.shape), atol=1e-9)


@pytest.mark.parametrize("n", [12, 120])  # dense path and Lanczos path
def test_hessian_extremes_match_numpy(n):
    rng = np.random.default_rng(n)
    # a bulk and a few outliers, the shape of a real loss Hessian's spectrum
    eigs = np.concatenate([rng.uniform(-0.5, 1.0, n - 6), [5.0, 4.2, 3.5, -3.0, -2.4, -2.0]])
    a = symmetric(n, eigs, seed=n)
    res = hessian_extremes(lambda x: quadratic(a)(x[None])[0], torch.randn(n, dtype=torch.float64), k=3,
                           tol=1e-10, dense_below=64, iterations=119)
    srt = np.sort(eigs)
    np.testing.assert_allclose(res["top"], srt[::-1][:3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res["bottom"], srt[:3], rtol=1e-6, atol=1e-6)
    assert res["method"] == ("dense" if n < 64 else "lanczos")
    if n >= 64:
        assert res["hvp_count"] < n  # never formed the matrix
    assert res["negative_ratio"] == pytest.approx(max(0, -srt[0]) / max(abs(srt[-1]), abs(srt[0])))


def test_hessian_of_a_non_quadratic_function_against_autograd():
    x0 = torch.randn(8, dtype=torch.float64)

    def f(x):
        return torch.tanh(x).pow(3).sum() + (x[:4] * x[4:]).sum() * torch.sin(x.sum())

    h = torch.autograd.functional.hessian(f, x0).numpy()
    res = hessian_extremes(f, x0, k=2, dense_below=64)
    srt = np.linalg.eigvalsh(h)
    np.testing.assert_allclose(res["top"], srt[::-1][:2], atol=1e-8)
    np.testing.assert_allclose(res["bottom"], srt[:2], atol=1e-8)


class QuadraticProbe(LightningModule):
    """The evidence protocol on a known function: trigger [2, 3], loss 0.5 x^T A x."""

    def __init__(self, a: torch.Tensor, folder):
        super().__init__()
        self.a, self.folder, self.evidence = a, folder, {}
        self.x = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def evidence_point(self):
        return self.x.detach(), quadratic(self.a), self.folder


def test_callbacks_record_the_known_spectrum_and_write_figures(tmp_path):
    eigs = np.array([4.0, 2.5, 1.0, 0.5, -0.25, -2.0])
    a = symmetric(6, eigs, seed=5)
    module = QuadraticProbe(a, tmp_path)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    lands, hess = LossLandscape(steps=9, radius=1.0, relative=False), HessianSpectrum(k=2, dense_below=64)
    module.trainer = trainer
    lands.on_fit_end(trainer, module)
    hess.on_fit_end(trainer, module)
    assert module.evidence["hessian"]["top"] == pytest.approx([4.0, 2.5])
    assert module.evidence["hessian"]["bottom"] == pytest.approx([-2.0, -0.25])
    center = np.array(module.evidence["landscape"]["center_eigenvalues"])
    assert eigs.min() - 1e-9 <= center.min() and center.max() <= eigs.max() + 1e-9  # Cauchy interlacing
    assert (tmp_path / "landscape.png").stat().st_size > 1000
    assert (tmp_path / "hessian.png").stat().st_size > 1000


# ----- the scan's forward on a real adapter --------------------------------------------------
