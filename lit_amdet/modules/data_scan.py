"""`SampleEmbedding`: per-sample embeddings of an image-caption data set, to find poisoned pairs (SPEC §4).

Poisoned pairs have sparse local neighbourhoods in the embedding space of the
CLIP trained on them (Huang et al., ICLR 2025). ``lit-amdet scan_data``
(`lit_amdet.commands.scan_data`) runs this module through ``Trainer.predict``;
`lit_amdet.sample_scan.score_and_report` then scores the embeddings with the
kNN detectors of `lit_amdet.outliers` and writes the report.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from lit_amdet.errors import ConfigError
from lit_amdet.modules.base import EncoderTask
from lit_amdet.sample_scan import MODALITIES, Modality


class SampleEmbedding(EncoderTask):
    """Per-sample embeddings of an image-caption data set, for `lit_amdet.sample_scan.score_and_report`.

    Args:
        encoder: checkpoint of the (possibly backdoored) CLIP-like model trained on the data.
        modality: what the detectors see: ``image``, ``text`` or ``both`` (the concatenation of
            the L2-normalised image and text embeddings, as in the paper).
        allow_pickle: allow loading a checkpoint that needs unpickling.
    """

    def __init__(self, encoder: str, modality: Modality = "both", allow_pickle: bool = False) -> None:
        super().__init__()

    def configure_models(self) -> None:
        hp = self.hparams
        if hp.modality not in MODALITIES:
            raise ConfigError(f"modality must be one of {', '.join(MODALITIES)} (got {hp.modality!r})")
        self.encoder = self.open_encoder(hp.encoder, None, hp.allow_pickle)
        self.encoder.eval().requires_grad_(False)
        if hp.modality != "text" and not self.encoder.has_image_tower:
            raise ConfigError(f"modality {hp.modality!r} needs an image tower; {self.encoder.name} "
                              f"({self.encoder.family}) has none (use modality: text)")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        # Moved to CPU per batch: the whole set's embeddings would not fit next to the model on the GPU.
        out: dict[str, Any] = {"index": batch["index"].cpu(), "caption": list(batch["text"])}
        out["text"] = F.normalize(self.encoder.encode(batch["tokens"]).pooled.float(), dim=-1).cpu()
        if "pixel_values" in batch:  # also for modality text: the clip-score baseline needs both towers
            out["image"] = F.normalize(self.encoder.encode_image(batch["pixel_values"]).float(), dim=-1).cpu()
        elif self.hparams.modality != "text":
            raise ConfigError(f"modality {self.hparams.modality!r} needs images, but the data has none "
                              "(set data.image_column, or use modality: text)")
        return out
