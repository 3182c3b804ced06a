"""Evidence callbacks of the AMDET scan (the loss landscape and the Hessian spectrum around the trigger), and
`DriftStop`, which trains a model to a chosen drift from its base (the benchmark's drift sweep)."""

from lit_amdet.callbacks.drift import DriftStop, pooled_drift
from lit_amdet.callbacks.hessian import HessianSpectrum, hessian_extremes
from lit_amdet.callbacks.landscape import LossLandscape, loss_landscape

__all__ = ["DriftStop", "HessianSpectrum", "LossLandscape", "hessian_extremes", "loss_landscape", "pooled_drift"]
