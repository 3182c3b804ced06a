"""The shared DataModule."""

from lit_amdet.datamodules.text_encoder import TextEncoderDataModule

__all__ = ["TextEncoderDataModule"]
