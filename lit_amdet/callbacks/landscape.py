"""`LossLandscape`: the 2-D loss surface around the recovered pseudo-trigger (AMDET's natural-backdoor filter).

Directions: d1 = the normalised negative gradient at the trigger, d2 = a seeded
random direction orthogonalised to d1. The loss is evaluated on the whole grid
in large batches (many grid points per forward pass), and the 2x2 Hessian at
every interior grid point comes from central finite differences divided by the
squared grid spacing, so its eigenvalues are curvatures in loss units and the
positive-eigenvalue threshold means the same for every grid. The same grid
feeds the figure and the decision.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lit_amdet.callbacks.publish import publish_figure

LossFn = Callable[[Tensor], Tensor]  # [N, *shape] candidate points -> [N] losses


def plane_directions(grad: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """d1 = -grad / |grad| (a random unit vector if the gradient vanishes), d2 random and orthogonal to d1."""
    g = torch.Generator().manual_seed(seed)
    d1 = -grad.detach().float().cpu()
    if d1.norm() < 1e-12:
        d1 = torch.randn(grad.shape, generator=g)
    d1 = d1 / d1.norm()
    d2 = torch.randn(grad.shape, generator=g)
    d2 = d2 - (d2 * d1).sum() * d1
    return d1.to(grad.device), (d2 / d2.norm()).to(grad.device)


def hessian_2x2_eigenvalues(values: Tensor, spacing: float) -> Tensor:
    """Eigenvalues [G-2, G-2, 2] (ascending) of the finite-difference Hessian at each interior grid point."""
    v, h2 = values.double(), spacing ** 2
    c = v[1:-1, 1:-1]
    d_aa = (v[2:, 1:-1] - 2 * c + v[:-2, 1:-1]) / h2
    d_bb = (v[1:-1, 2:] - 2 * c + v[1:-1, :-2]) / h2
    d_ab = (v[2:, 2:] - v[2:, :-2] - v[:-2, 2:] + v[:-2, :-2]) / (4 * h2)
    mean, rad = (d_aa + d_bb) / 2, torch.sqrt(((d_aa - d_bb) / 2) ** 2 + d_ab ** 2)
    return torch.stack([mean - rad, mean + rad], dim=-1)


@torch.no_grad()
def loss_landscape(loss_fn: LossFn, center: Tensor, d1: Tensor, d2: Tensor, radius: float, steps: int,
                   chunk: int = 256, eigen_tol: float = 1e-6) -> dict:
    """Loss on the ``steps x steps`` grid ``center + a*d1 + b*d2``, a, b in [-radius, radius], and its curvature."""
    if steps < 3:
        raise ValueError("the landscape grid needs at least 3 points per axis")
    coords = torch.linspace(-radius, radius, steps, dtype=torch.float64)
    a, b = torch.meshgrid(coords, coords, indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    shape = (-1,) + (1,) * center.dim()
    values = []
    for i in range(0, len(a), chunk):
        pa = a[i:i + chunk].to(center.device, center.dtype).view(shape)
        pb = b[i:i + chunk].to(center.device, center.dtype).view(shape)
        values.append(loss_fn(center[None] + pa * d1[None] + pb * d2[None]).detach().double().cpu())
    grid = torch.cat(values).reshape(steps, steps)
    spacing = float(coords[1] - coords[0])
    eig = hessian_2x2_eigenvalues(grid, spacing)
    mid = (steps - 2) // 2
    return {
        "coords": coords, "values": grid, "eigenvalues": eig, "spacing": spacing, "radius": radius,
        "positive_ratio": float((eig > eigen_tol).double().mean()),
        "center_eigenvalues": eig[mid, mid].tolist(),
        "center_loss": float(grid[steps // 2, steps // 2]),
        "eigen_tol": eigen_tol,
    }


def landscape_figure(result: dict, title: str = "loss landscape"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords, values = result["coords"].numpy(), result["values"].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    cs = axes[0].contourf(coords, coords, values.T, levels=30, cmap="viridis")
    axes[0].plot([0], [0], "r*", markersize=12, label="trigger")
    axes[0].set_xlabel("α (−gradient direction)")
    axes[0].set_ylabel("β (random orthogonal direction)")
    axes[0].legend(loc="upper right")
    fig.colorbar(cs, ax=axes[0], label="loss")
    positive = (result["eigenvalues"] > result["eigen_tol"]).sum(-1).numpy()
    inner = coords[1:-1]
    im = axes[1].pcolormesh(inner, inner, positive.T, cmap="RdYlGn", vmin=0, vmax=2, shading="auto")
    axes[1].set_title(f"positive Hessian eigenvalues per point (ratio {result['positive_ratio']:.2f})")
    fig.colorbar(im, ax=axes[1], ticks=[0, 1, 2])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class LossLandscape(Callback):
    """After the trigger search, sweep the loss around the best trigger and record its curvature.

    The LightningModule provides ``evidence_point()`` -> (trigger tensor, batched
    loss function, output folder or None) and an ``evidence`` dict the result is
    written into (`BackdoorDetection` does).

    Args:
        steps: grid points per axis (the grid is steps x steps).
        radius: half-width of the grid; in units of the trigger's norm when ``relative``.
        relative: scale ``radius`` by the trigger's Frobenius norm (the trigger's scale differs per model).
        eigen_tol: an eigenvalue counts as positive above this (curvature units: loss / distance²).
        chunk: grid points per batched evaluation.
        seed: the random second direction.
    """

    def __init__(self, steps: int = 15, radius: float = 0.5, relative: bool = True, eigen_tol: float = 1e-6,
                 chunk: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.steps, self.radius, self.relative = steps, radius, relative
        self.eigen_tol, self.chunk, self.seed = eigen_tol, chunk, seed
        self.result: dict | None = None

    def compute(self, center: Tensor, loss_fn: LossFn) -> dict:
        x = center.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            grad = torch.autograd.grad(loss_fn(x[None]).sum(), x)[0]
        d1, d2 = plane_directions(grad, self.seed)
        radius = self.radius * (float(center.norm()) if self.relative else 1.0)
        return loss_landscape(loss_fn, center.detach(), d1, d2, radius, self.steps, self.chunk, self.eigen_tol)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        t0 = time.perf_counter()
        center, loss_fn, folder = pl_module.evidence_point()
        self.result = res = self.compute(center, loss_fn)
        res["seconds"] = time.perf_counter() - t0
        summary = {k: res[k] for k in ("positive_ratio", "center_eigenvalues", "center_loss", "radius", "spacing",
                                       "eigen_tol", "seconds")}
        summary["grid"] = self.steps
        summary["relative_radius"] = self.radius if self.relative else None
        pl_module.evidence["landscape"] = summary
        if trainer.is_global_zero:
            publish_figure(trainer, folder, landscape_figure(res), "landscape",
                           {"landscape/positive_ratio": res["positive_ratio"],
                            "landscape/center_min_eigenvalue": res["center_eigenvalues"][0]})
