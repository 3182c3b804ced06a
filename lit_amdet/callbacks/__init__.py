"""Evidence callbacks of the AMDET scan: the loss landscape and the Hessian spectrum around the trigger."""

from lit_amdet.callbacks.hessian import HessianSpectrum, hessian_extremes
from lit_amdet.callbacks.landscape import LossLandscape, loss_landscape

__all__ = ["HessianSpectrum", "LossLandscape", "hessian_extremes", "loss_landscape"]
