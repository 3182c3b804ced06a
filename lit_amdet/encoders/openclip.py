"""Adapter for open_clip ``CLIP`` and ``CustomTextCLIP`` models with open_clip's own text transformer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lit_amdet.encoders.base import TextEncoderAdapter, TokenBatch
from lit_amdet.errors import CheckpointError, ConfigError, LitAmdetError

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"


class OpenCLIPAdapter(TextEncoderAdapter):
    """open_clip models whose text tower is open_clip's ``TextTransformer``.

    ``CLIP`` keeps the text modules on the model itself, ``CustomTextCLIP`` under
    ``.text``; ``self.text`` hides which. Pooling follows the tower's
    ``pool_type`` (argmax / eos / first / last).
    """

    family = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, model_cfg: dict, preprocess_cfg: dict | None = None,
                 name: str = "encoder") -> None:
        super().__init__(model, tokenizer, name)
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg or {}
        text = getattr(model, "text", model)
        if getattr(text, "cls_emb", None) is not None:
            raise CheckpointError("open_clip text towers with an appended CLS token (CoCa) are not supported")
        if not hasattr(text, "token_embedding"):
            raise CheckpointError(
                "open_clip model with a Hugging Face text tower: load that tower as an HF checkpoint instead"
            )
        pool = getattr(text, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
        if pool not in ("argmax", "eos", "first", "last"):
            raise CheckpointError(f"open_clip text pool_type {pool!r} is not supported")
        self.pool_type = pool
        self.pooling = "last" if pool == "last" else "index"
        self.keeps_end_token = pool in ("argmax", "eos")
        self.use_pad_mask = bool(getattr(text, "use_pad_mask", False))
        # A bidirectional tower without a pad mask attends to its padding, and a tower pooled at the last position
        # reads the last of its whole context: pad to the context, as trained (a pad mask still hides the padding).
        self.pads_to_context = pool == "last" or (not self.causal and not self.use_pad_mask)
        self.eos_id = getattr(text, "eos_id", None) if text is not model else getattr(model, "text_eos_id", None)

    @property
    def text(self) -> nn.Module:
        return getattr(self.model, "text", self.model)

    @property
    def width(self) -> int:
        return self.text.token_embedding.embedding_dim

    @property
    def depth(self) -> int:
        return self.text.transformer.layers

    @property
    def embed_dim(self) -> int:
        proj = self.text.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        return self.text.positional_embedding.shape[0]

    @property
    def causal(self) -> bool:
        return self.text.attn_mask is not None

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text.token_embedding

    @property
    def has_image_tower(self) -> bool:
        return getattr(self.model, "visual", None) is not None

    def image_parameter_names(self) -> list[str]:
        # the image tower (its projection inside it) lives under ``visual`` in CLIP and CustomTextCLIP
        return self.parameter_names_under("visual")

    def text_projection_parameter_names(self) -> list[str]:
        # CLIP keeps the projection on the model itself, CustomTextCLIP on its ``text`` tower
        prefix = "text." if self.text is not self.model else ""
        return self.parameter_names_under(f"{prefix}text_projection")

    def batch_from_ids(self, ids, token_mask):
        batch = super().batch_from_ids(ids, token_mask)
        if self.use_pad_mask:  # padded to the context (pooled last) or not, the padding stays masked
            batch.attention_mask = token_mask
        if self.pool_type == "argmax":
            batch.pool_index = ids.argmax(-1)
        elif self.pool_type == "eos":
            batch.pool_index = (ids == self.eos_id).int().argmax(-1)
        elif self.pool_type == "first":
            batch.pool_index = torch.zeros_like(batch.pool_index)
        return batch

    def embed_vectors(self, vectors: Tensor) -> Tensor:
        cast = self.text.transformer.get_cast_dtype()
        return vectors.to(cast) + self.text.positional_embedding[: vectors.shape[1]].to(cast)

    def position_embedding(self, positions: Tensor) -> Tensor:
        return self.text.positional_embedding[positions]

    def run_layers(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        length = hidden.shape[1]
        mask = self.text.attn_mask
        if mask is not None:
            mask = mask[:length, :length].to(hidden.dtype)
        if self.use_pad_mask:
            heads = self.text.transformer.resblocks[0].attn.num_heads
            pad = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
            pad = pad.masked_fill(~attention_mask.bool(), float("-inf"))
            pad = pad[:, None, :].expand(-1, length, -1).repeat_interleave(heads, 0)
            mask = pad if mask is None else mask.unsqueeze(0) + pad
        x = self.text.transformer(hidden, attn_mask=mask)
        return self.text.ln_final(x)

    def attention_maps(self, batch: TokenBatch) -> Tensor:
        batch = batch.to(self.device)
        attentions = [getattr(block, "attn", None) for block in self.text.transformer.resblocks]
        if not all(isinstance(a, nn.MultiheadAttention) for a in attentions):
            raise LitAmdetError(f"{self.name}: attention maps need open_clip's default nn.MultiheadAttention "
                                "blocks; this text tower uses custom attention blocks")
        captured: list[Tensor] = []

        def ask_for_weights(_module, args, kwargs):
            # The blocks call with need_weights=False; ask the same call for per-head probabilities instead.
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        handles = [a.register_forward_pre_hook(ask_for_weights, with_kwargs=True) for a in attentions]
        handles += [a.register_forward_hook(lambda _m, _a, out: captured.append(out[1])) for a in attentions]
        try:
            self.run_layers(self.embed(batch.input_ids), batch.attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(captured, dim=1)

    def project(self, pooled: Tensor) -> Tensor:
        proj = self.text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        if not self.has_image_tower:
            return super().encode_image(pixel_values)
        return self.model.encode_image(pixel_values.to(self.device))

    def image_transform(self) -> Callable:
        from open_clip import image_transform
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        size = self.model.visual.image_size
        cfg = self.preprocess_cfg
        return image_transform(
            cfg.get("size", size), is_train=False,
            mean=cfg.get("mean", OPENAI_DATASET_MEAN), std=cfg.get("std", OPENAI_DATASET_STD),
        )

    def save(self, path: str | Path) -> Path:
        """Write an open_clip ``local-dir:`` folder: ``open_clip_config.json`` + safetensors weights."""
        if self.text_tower_of:  # its config still describes the image tower the load left out
            raise ConfigError(f"{self.name}: its text tower was loaded alone ({self.text_tower_of}); load the "
                              "whole model to save it")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
        (path / OPENCLIP_CONFIG).write_text(json.dumps(cfg, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / OPENCLIP_WEIGHTS))
        self.tokenizer.save_pretrained(path / "tokenizer")
        return path
