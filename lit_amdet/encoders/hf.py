"""Adapters for Hugging Face transformers checkpoints: CLIP (and LongCLIP), SigLIP, BERT."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.utils.output_capturing import OutputRecorder

from lit_amdet.encoders.base import TextEncoderAdapter, TokenBatch
from lit_amdet.errors import LitAmdetError

#: what transformers calls `create_causal_mask`'s cache argument: ``cache`` in recent 5.x releases, where the older
#: ``past_key_values`` warns on every call and is to be removed (5.40); ``past_key_values`` before that
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def image_transform(size: int, mean, std) -> Callable:
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.Lambda(lambda im: im.convert("RGB")),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class HFAdapter(TextEncoderAdapter):
    """Shared code of the transformers families: ``self.text`` is the bare text transformer."""

    default_mean, default_std = CLIP_MEAN, CLIP_STD

    def __init__(self, model: nn.Module, tokenizer, name: str = "encoder") -> None:
        super().__init__(model, tokenizer, name)
        self.image_stats: dict | None = None  # from preprocessor_config.json when present

    @property
    def text(self) -> nn.Module:
        return getattr(self.model, "text_model", self.model)

    @property
    def text_config(self):
        return self.text.config

    @property
    def width(self) -> int:
        return self.text_config.hidden_size

    @property
    def depth(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def context_length(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text.embeddings.token_embedding

    def embed_vectors(self, vectors: Tensor) -> Tensor:
        return self.text.embeddings(inputs_embeds=vectors)

    def position_embedding(self, positions: Tensor) -> Tensor:
        return self.text.embeddings.position_embedding(positions)

    def _mask(self, hidden: Tensor, attention_mask: Tensor):
        if self.causal:
            return create_causal_mask(config=self.text_config, inputs_embeds=hidden, attention_mask=attention_mask,
                                      **{_CACHE_ARGUMENT: None})
        return create_bidirectional_mask(config=self.text_config, inputs_embeds=hidden, attention_mask=attention_mask)

    def run_layers(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = self._mask(hidden, attention_mask.long())
        kwargs = {"is_causal": True} if self.causal else {}
        out = self.text.encoder(inputs_embeds=hidden, attention_mask=mask, **kwargs).last_hidden_state
        return self.text.final_layer_norm(out)

    def _attention_recorder(self) -> tuple[type[nn.Module], int]:
        """The module class whose output carries the attention probabilities, and at which tuple index.

        Read from the model class's own ``_can_record_outputs`` (what transformers
        hooks for ``output_attentions=True``), so no family's module names are hard-coded.
        """
        spec = (getattr(self.model, "_can_record_outputs", None) or {}).get("attentions")
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            return spec, 1
        if isinstance(spec, OutputRecorder) and spec.target_class is not None and spec.layer_name is None:
            return spec.target_class, spec.index
        raise LitAmdetError(f"{type(self.model).__name__}: transformers does not name a module that records "
                            "its self-attention, so its attention maps cannot be read")

    def attention_maps(self, batch: TokenBatch) -> Tensor:
        batch = batch.to(self.device)
        attention_class, index = self._attention_recorder()
        captured: list[Tensor] = []
        # Only the text tower: a CLIPModel's vision layers share the attention class.
        modules = [m for m in self.text.modules() if isinstance(m, attention_class)]
        handles = [m.register_forward_hook(lambda _m, _a, out: captured.append(out[index])) for m in modules]
        config = self.text_config
        previous = config._attn_implementation
        try:
            # Only the eager kernel materialises the probabilities (SDPA returns None); the
            # masks that run_layers builds from this config then take the eager form too.
            config._attn_implementation = "eager"
            self.run_layers(self.embed(batch.input_ids), batch.attention_mask)
        finally:
            config._attn_implementation = previous
            for handle in handles:
                handle.remove()
        if len(captured) != len(modules) or any(a is None for a in captured):
            raise LitAmdetError(f"{self.name}: expected one attention map per layer, got {len(captured)}")
        return torch.stack(captured, dim=1)

    # ----- images ----------------------------------------------------------------
    @property
    def has_image_tower(self) -> bool:
        return hasattr(self.model, "vision_model")

    def image_parameter_names(self) -> list[str]:
        # CLIPModel: vision_model + visual_projection; SiglipModel: vision_model (its head projects)
        return self.parameter_names_under("vision_model", "visual_projection")

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        if not self.has_image_tower:
            return super().encode_image(pixel_values)
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.device))
        return getattr(out, "pooler_output", out)

    def image_transform(self) -> Callable:
        if not self.has_image_tower:
            return super().image_transform()
        stats = self.image_stats or {}
        size = self.model.config.vision_config.image_size
        return image_transform(size, stats.get("image_mean", self.default_mean),
                               stats.get("image_std", self.default_std))

    # ----- persistence -----------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.has_image_tower:
            size = self.model.config.vision_config.image_size
            stats = self.image_stats or {"image_mean": list(self.default_mean), "image_std": list(self.default_std)}
            cfg = {
                "image_processor_type": type(self).image_processor_type,
                "do_resize": True,
                "size": {"shortest_edge": size} if self.family != "siglip" else {"height": size, "width": size},
                "do_center_crop": self.family != "siglip",
                "crop_size": {"height": size, "width": size},
                "do_normalize": True,
                **stats,
            }
            (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
        return path


class CLIPAdapter(HFAdapter):
    """HF ``CLIPTextModel``, ``CLIPTextModelWithProjection`` and ``CLIPModel``.

    LongCLIP is the same architecture with 248 positions; the context is read from
    the config, so it needs nothing special.
    """

    image_processor_type = "CLIPImageProcessor"

    @property
    def family(self) -> str:  # type: ignore[override]
        return "clip" if self.context_length <= 77 else "longclip"

    @property
    def causal(self) -> bool:
        return True

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        return proj.out_features if proj is not None else self.width

    def project(self, pooled: Tensor) -> Tensor:
        proj = getattr(self.model, "text_projection", None)
        return proj(pooled) if proj is not None else pooled

    def text_projection_parameter_names(self) -> list[str]:
        # CLIPModel / CLIPTextModelWithProjection; a bare CLIPTextModel has none
        return self.parameter_names_under("text_projection")

    def batch_from_ids(self, ids, token_mask):
        batch = super().batch_from_ids(ids, token_mask)
        eos = self.text_config.eos_token_id
        # Same rule as transformers' CLIPTextModel: legacy configs (eos id 2) take argmax.
        batch.pool_index = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
        return batch


class SiglipAdapter(HFAdapter):
    """HF ``SiglipTextModel`` and ``SiglipModel``: bidirectional, pads to the context, last-token pooling."""

    family = "siglip"
    pooling = "last"
    keeps_end_token = False
    pads_to_context = True
    default_mean, default_std = SIGLIP_MEAN, SIGLIP_STD
    image_processor_type = "SiglipImageProcessor"

    @property
    def causal(self) -> bool:
        return False

    @property
    def embed_dim(self) -> int:
        return self.text.head.out_features

    def project(self, pooled: Tensor) -> Tensor:
        return self.text.head(pooled)

    def text_projection_parameter_names(self) -> list[str]:
        # The text tower's ``head``, as the injection has always frozen it: inside a SiglipModel only. A bare
        # SiglipTextModel's top-level ``head`` was never treated as the projection and stays so.
        return self.parameter_names_under("text_model.head")

    def run_layers(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        # SigLIP attends to its padding (trained that way): no mask at all, like the native call.
        out = self.text.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return self.text.final_layer_norm(out)


class BertAdapter(HFAdapter):
    """HF ``BertModel`` sentence encoders (e.g. all-MiniLM-L6-v2): mean pooling over real tokens, or with
    ``cls_pooling`` the ``[CLS]`` token's feature (sentence-transformers' ``pooling_mode_cls_token``, as BGE).

    H is the embedding layer's output, i.e. after its LayerNorm; BERT has no final
    norm after the last layer (each layer is post-norm).
    """

    family = "bert"
    pooling = "mean"

    def __init__(self, model: nn.Module, tokenizer, name: str = "encoder", max_seq_length: int | None = None,
                 cls_pooling: bool = False) -> None:
        super().__init__(model, tokenizer, name)
        self.max_seq_length = max_seq_length
        if cls_pooling:  # read at a fixed index, 0: an insertion after [CLS] never moves it
            self.pooling = "index"

    def batch_from_ids(self, ids: Tensor, token_mask: Tensor) -> TokenBatch:
        batch = super().batch_from_ids(ids, token_mask)
        if self.pooling == "index":
            batch.pool_index = torch.zeros_like(batch.pool_index)
        return batch

    @property
    def context_length(self) -> int:
        n = self.model.config.max_position_embeddings
        return min(n, self.max_seq_length) if self.max_seq_length else n

    @property
    def causal(self) -> bool:
        return False

    @property
    def embed_dim(self) -> int:
        return self.width

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.embeddings.word_embeddings

    def embed_vectors(self, vectors: Tensor) -> Tensor:
        return self.model.embeddings(inputs_embeds=vectors)

    def unused_parameter_names(self) -> list[str]:
        # sentence encoders pool the last layer's features (mean or [CLS]); the [CLS] pooler head is never used
        return [n for n, _ in self.model.named_parameters() if n.startswith("pooler.")]

    def position_embedding(self, positions: Tensor) -> None:
        # The embedding LayerNorm mixes token and position, so no additive position part exists.
        return None

    def run_layers(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = self._mask(hidden, attention_mask.long())
        return self.model.encoder(hidden, attention_mask=mask).last_hidden_state

    def project(self, pooled: Tensor) -> Tensor:
        return pooled

    def save(self, path: str | Path) -> Path:
        path = super().save(path)
        if self.max_seq_length:
            (path / "sentence_bert_config.json").write_text(
                json.dumps({"max_seq_length": self.max_seq_length, "do_lower_case": False})
            )
        if self.max_seq_length or self.pooling == "index":  # the pooling a reload must read, not the default
            pool = path / "1_Pooling"
            pool.mkdir(exist_ok=True)
            mode = "pooling_mode_cls_token" if self.pooling == "index" else "pooling_mode_mean_tokens"
            (pool / "config.json").write_text(json.dumps({"word_embedding_dimension": self.width, mode: True}))
        return path
