"""lit-amdet: inject, fine-tune and detect textual backdoors in vision-language encoders."""

from lit_amdet.encoders import TextEncoderAdapter, load_encoder
from lit_amdet.errors import CheckpointError, ConfigError, LitAmdetError, UnsafeCheckpointError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "LitAmdetError", "TextEncoderAdapter", "UnsafeCheckpointError",
           "load_encoder"]
