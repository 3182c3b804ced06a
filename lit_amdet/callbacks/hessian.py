"""`HessianSpectrum`: extreme eigenvalues of the exact Hessian of the scan loss with respect to the trigger.

Hessian-vector products come from double backward through the loss (the
gradient graph is built once and reused for every product); a Lanczos
solver finds the largest and smallest eigenvalues from one Krylov space
without ever forming the ``kW x kW`` matrix. Small problems (fewer
unknowns than ``dense_below``) build the Hessian column by column and use a
dense symmetric solver instead, which is exact and faster there.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lit_amdet.callbacks.publish import publish_figure


def _math_attention():
    # fused CPU/GPU attention kernels have no double backward; the math kernel does
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def lanczos_extremes(matvec: Callable[[np.ndarray], np.ndarray], n: int, k: int, iterations: int,
                     tol: float = 1e-4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """Ritz values of a symmetric operator from one Krylov space: both spectrum ends at once.

    Lanczos with full reorthogonalisation (exact in floating point for the few
    dozen steps used here); stops once the k largest and k smallest Ritz values
    have residual bounds below ``tol`` times the spectral scale, or after
    ``iterations`` products. Returns (Ritz values ascending, residual bounds, converged).
    """
    q = np.random.default_rng(seed).standard_normal(n)
    basis = [q / np.linalg.norm(q)]
    alphas, betas = [], []
    theta, bounds, converged = np.zeros(0), np.zeros(0), False
    for j in range(min(iterations, n)):
        w = matvec(basis[j])
        alphas.append(float(w @ basis[j]))
        q_mat = np.asarray(basis)
        for _ in range(2):  # twice is enough to keep the basis orthogonal
            w = w - q_mat.T @ (q_mat @ w)
        beta = float(np.linalg.norm(w))
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, vecs = np.linalg.eigh(t)
        bounds = beta * np.abs(vecs[-1])
        ends = np.r_[np.arange(min(k, len(theta))), np.arange(max(0, len(theta) - k), len(theta))]
        scale = max(np.abs(theta).max(), 1e-30)
        if beta < 1e-10 * scale or (len(theta) >= 2 * k and (bounds[ends] <= tol * scale).all()):
            converged = True
            break
        betas.append(beta)
        basis.append(w / beta)
    return theta, bounds, converged or len(theta) == n


def hessian_extremes(loss_fn: Callable[[Tensor], Tensor], x: Tensor, k: int = 3, tol: float = 1e-4,
                     dense_below: int = 64, iterations: int = 60) -> dict:
    """The ``k`` largest and ``k`` smallest eigenvalues of d²loss/dx² at ``x`` (loss_fn: x -> scalar).

    Hessian-vector products by double backward; Lanczos (at most ``iterations``
    products) above ``dense_below`` unknowns, the dense matrix below.
    """
    n = x.numel()
    k = max(1, min(k, n))
    with _math_attention(), torch.enable_grad():
        xv = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(xv), xv, create_graph=True)
        flat = grad.reshape(-1)
        products = 0

        def hvp(v: np.ndarray) -> np.ndarray:
            nonlocal products
            products += 1
            vec = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1), dtype=flat.dtype, device=flat.device)
            (hv,) = torch.autograd.grad(flat, xv, grad_outputs=vec.view_as(flat), retain_graph=True)
            return hv.reshape(-1).double().cpu().numpy()

        if n < dense_below or 2 * k >= n:
            h = np.stack([hvp(e) for e in np.eye(n)], axis=1)
            eig = np.linalg.eigvalsh((h + h.T) / 2)
            method, converged = "dense", True
        else:
            eig, _, converged = lanczos_extremes(hvp, n, k, iterations, tol)
            method = "lanczos"
    top, bottom = [float(v) for v in eig[::-1][:k]], [float(v) for v in eig[:k]]
    scale = max(abs(top[0]), abs(bottom[0]), 1e-12)
    return {"top": top, "bottom": bottom, "method": method, "dimension": n, "hvp_count": products,
            "converged": bool(converged),
            # how negative the most negative curvature is relative to the largest: ~0 in a convex basin
            "negative_ratio": max(0.0, -bottom[0]) / scale}


def spectrum_figure(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    top, bottom = result["top"], result["bottom"]
    ax.stem(range(len(top)), top, linefmt="C0-", markerfmt="C0o", basefmt=" ", label="largest")
    ax.stem(range(len(top), len(top) + len(bottom)), bottom, linefmt="C3-", markerfmt="C3o", basefmt=" ",
            label="smallest")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([])
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title(f"Hessian of the scan loss w.r.t. the trigger ({result['dimension']} dims, {result['method']})")
    ax.legend()
    fig.tight_layout()
    return fig


class HessianSpectrum(Callback):
    """After the trigger search, the extreme eigenvalues of the loss Hessian at the best trigger.

    Args:
        k: number of largest and of smallest eigenvalues.
        tol: Lanczos relative tolerance.
        dense_below: use a dense solver below this many unknowns.
        iterations: Lanczos steps at most (one Hessian-vector product each): bounds the cost.
    """

    def __init__(self, k: int = 3, tol: float = 1e-3, dense_below: int = 64, iterations: int = 40) -> None:
        super().__init__()
        self.k, self.tol, self.dense_below, self.iterations = k, tol, dense_below, iterations
        self.result: dict | None = None

    def compute(self, center: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> dict:
        return hessian_extremes(lambda x: loss_fn(x[None]).sum(), center.detach(), self.k, self.tol,
                                self.dense_below, self.iterations)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        t0 = time.perf_counter()
        center, loss_fn, folder = pl_module.evidence_point()
        self.result = res = self.compute(center, loss_fn)
        res["seconds"] = time.perf_counter() - t0
        pl_module.evidence["hessian"] = res
        if trainer.is_global_zero:
            publish_figure(trainer, folder, spectrum_figure(res), "hessian",
                           {"hessian/top": res["top"][0], "hessian/bottom": res["bottom"][0],
                            "hessian/negative_ratio": res["negative_ratio"]})
