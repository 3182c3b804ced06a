"""LightningModules: one task per file."""

from lit_amdet.modules.base import EncoderTask
from lit_amdet.modules.contrastive import ContrastiveTraining
from lit_amdet.modules.detection import BackdoorDetection
from lit_amdet.modules.injection import BackdoorInjection

__all__ = ["BackdoorDetection", "BackdoorInjection", "ContrastiveTraining", "EncoderTask"]
