"""`EncoderSpec`: a freshly initialised model of any supported family, sized by the config.

Used to pretrain the world's bases from scratch, and (via `lit_amdet.tiny`) to
make tiny models for tests and big random ones for timing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from lit_amdet.encoders.base import TextEncoderAdapter
from lit_amdet.encoders.tokenizers import clip_bpe_tokenizer
from lit_amdet.errors import ConfigError

CLIP_VOCAB = 49408

Family = Literal["clip", "longclip", "siglip", "open_clip", "bert"]


@dataclass
class EncoderSpec:
    """Architecture of a new model. ``arch`` picks the native class within a family.

    clip / longclip: ``CLIPModel`` (default), ``CLIPTextModel``, ``CLIPTextModelWithProjection``;
    siglip: ``SiglipModel`` (default), ``SiglipTextModel``; open_clip: ``CLIP`` (default) or
    ``CustomTextCLIP``; bert: ``BertModel``. ``context`` defaults to the family's own
    (77, 248, 64, 77, 64).
    """

    family: Family = "clip"
    arch: str | None = None
    width: int = 32
    layers: int = 2
    heads: int = 2
    context: int | None = None
    embed_dim: int = 24
    vision_width: int | None = None
    vision_layers: int | None = None
    image_size: int = 32
    patch: int = 8
    causal: bool = True  # open_clip only
    pool_type: str = "argmax"  # open_clip only
    seed: int = 0

    def default_context(self) -> int:
        return self.context or {"clip": 77, "longclip": 248, "siglip": 64, "open_clip": 77, "bert": 64}[self.family]

    def build(self) -> TextEncoderAdapter:
        torch.manual_seed(self.seed)
        builder = {"clip": self._clip, "longclip": self._clip, "siglip": self._siglip,
                   "open_clip": self._open_clip, "bert": self._bert}.get(self.family)
        if builder is None:
            raise ConfigError(f"unknown family {self.family!r}")
        adapter = builder()
        adapter.name = f"new-{self.family}"
        return adapter

    # ----- families --------------------------------------------------------------
    def _text(self) -> dict:
        return dict(vocab_size=CLIP_VOCAB, hidden_size=self.width, intermediate_size=4 * self.width,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    max_position_embeddings=self.default_context())

    def _vision(self) -> dict:
        w = self.vision_width or self.width
        heads = max(1, w // (self.width // self.heads))
        return dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=self.vision_layers or self.layers,
                    num_attention_heads=heads, image_size=self.image_size, patch_size=self.patch)

    def _clip(self) -> TextEncoderAdapter:
        from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from lit_amdet.encoders.hf import CLIPAdapter

        arch = self.arch or "CLIPModel"
        text = dict(self._text(), projection_dim=self.embed_dim, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=49407)
        if arch == "CLIPModel":
            cfg = CLIPConfig(text_config=text, vision_config=dict(self._vision(), projection_dim=self.embed_dim),
                             projection_dim=self.embed_dim)
            model = CLIPModel(cfg)
        elif arch == "CLIPTextModelWithProjection":
            model = CLIPTextModelWithProjection(CLIPTextConfig(**text))
        elif arch == "CLIPTextModel":
            model = CLIPTextModel(CLIPTextConfig(**text))
        else:
            raise ConfigError(f"unknown CLIP architecture {arch!r}")
        return CLIPAdapter(model.eval(), clip_bpe_tokenizer(model_max_length=self.default_context()))

    def _siglip(self) -> TextEncoderAdapter:
        from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipTextModel

        from lit_amdet.encoders.hf import SiglipAdapter

        arch = self.arch or "SiglipModel"
        text = dict(self._text(), projection_size=self.embed_dim, pad_token_id=49407, bos_token_id=49406,
                    eos_token_id=49407)
        if arch == "SiglipModel":
            # SigLIP's text head maps to the vision width: keep both equal to embed_dim's role
            vision = dict(self._vision())
            text["projection_size"] = vision["hidden_size"]
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        elif arch == "SiglipTextModel":
            model = SiglipTextModel(SiglipTextConfig(**text))
        else:
            raise ConfigError(f"unknown SigLIP architecture {arch!r}")
        return SiglipAdapter(model.eval(), clip_bpe_tokenizer(model_max_length=self.default_context()))

    def open_clip_config(self) -> dict:
        text_cfg = dict(context_length=self.default_context(), vocab_size=CLIP_VOCAB, width=self.width,
                        heads=self.heads, layers=self.layers)
        if not self.causal:
            text_cfg["no_causal_mask"] = True
        if self.pool_type != "argmax":
            text_cfg["pool_type"] = self.pool_type
        w = self.vision_width or self.width
        cfg = dict(embed_dim=self.embed_dim, text_cfg=text_cfg,
                   vision_cfg=dict(image_size=self.image_size, layers=self.vision_layers or self.layers, width=w,
                                   patch_size=self.patch, head_width=self.width // self.heads))
        if (self.arch or "CLIP") == "CustomTextCLIP":
            cfg["custom_text"] = True
        return cfg

    def _open_clip(self) -> TextEncoderAdapter:
        import open_clip

        from lit_amdet.encoders.openclip import OpenCLIPAdapter

        model_cfg = self.open_clip_config()
        cfg = dict(model_cfg)
        cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
        tok = clip_bpe_tokenizer(pad_token="!", model_max_length=self.default_context())
        return OpenCLIPAdapter(cls(**cfg).eval(), tok, model_cfg)

    def _bert(self) -> TextEncoderAdapter:
        from transformers import BertConfig, BertModel, BertTokenizerFast

        from lit_amdet.encoders.hf import BertAdapter
        from lit_amdet.encoders.loading import builtin_path

        tok = BertTokenizerFast.from_pretrained(str(builtin_path("minilm")), local_files_only=True)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=self.width, intermediate_size=4 * self.width,
                         num_hidden_layers=self.layers, num_attention_heads=self.heads,
                         max_position_embeddings=self.default_context())
        return BertAdapter(BertModel(cfg).eval(), tok)

    def as_dict(self) -> dict:
        return asdict(self)
