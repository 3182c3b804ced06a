"""Publishing an evidence figure of the AMDET scan: a PNG in the run folder, a figure and scalars in the loggers."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer

from lit_amdet.io import write_with


def publish_figure(trainer: Trainer, folder: str | Path | None, fig, name: str, scalars: dict) -> Path | None:
    """Save ``fig`` as ``name``.png in ``folder`` (if any, atomically), log it as ``detect/<name>`` to loggers whose
    experiment has ``add_figure`` (TensorBoard) and ``scalars`` to every logger, then close it; the PNG's path."""
    import matplotlib.pyplot as plt

    path = None
    if folder is not None:
        # the temporary name keeps the .png suffix, but the format is explicit all the same
        path = write_with(Path(folder) / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "add_figure"):
            exp.add_figure(f"detect/{name}", fig, global_step=trainer.global_step)
        if scalars:
            logger.log_metrics(scalars, step=trainer.global_step)
    plt.close(fig)
    return path
