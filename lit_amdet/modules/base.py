"""`EncoderTask`: the small base of every LightningModule here (torchgeo style).

Subclasses call ``super().__init__()`` last in their ``__init__``; the base then
saves the hyper-parameters and calls three hooks once:
``configure_models`` (build/load encoders), ``configure_losses`` and
``configure_metrics``. The base attaches the trained encoder to a
`TextEncoderDataModule`, so batches are tokenised by the model's own adapter.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule

from lit_amdet.encoders import TextEncoderAdapter, load_encoder
from lit_amdet.encoders.architectures import EncoderSpec
from lit_amdet.errors import ConfigError


class EncoderTask(LightningModule):
    #: the adapter whose tokenizer/image transform the DataModule uses
    encoder: TextEncoderAdapter

    def __init__(self, ignore: list[str] | None = None) -> None:
        super().__init__()
        # collects the subclass's __init__ arguments from the calling frames
        self.save_hyperparameters(ignore=ignore)
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self) -> None:
        """Build or load the encoders."""

    def configure_losses(self) -> None:
        """Create loss modules."""

    def configure_metrics(self) -> None:
        """Create metric objects."""

    @staticmethod
    def open_encoder(encoder: str | None, architecture: EncoderSpec | None, allow_pickle: bool = False,
                     what: str = "encoder") -> TextEncoderAdapter:
        """A checkpoint (``encoder``) or a fresh model (``architecture``): exactly one of them."""
        if (encoder is None) == (architecture is None):
            raise ConfigError(f"give exactly one of {what} (a checkpoint) or architecture (a new model)")
        adapter = load_encoder(encoder, allow_pickle=allow_pickle) if encoder is not None else architecture.build()
        unused = set(adapter.unused_parameter_names())
        for name, p in adapter.model.named_parameters():
            if name in unused:
                p.requires_grad_(False)  # no gradient would reach it (and DDP rejects such parameters)
        return adapter

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "attach_encoder"):
            dm.attach_encoder(self.encoder)
