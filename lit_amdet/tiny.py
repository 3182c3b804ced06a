"""Small randomly initialised models of every supported family, written in their native format.

For plumbing tests and timing only: a random encoder says nothing about
detection (its clean prompts already look "assimilated"). The sizes are
arguments, so the same builders make ViT-L/14-sized text towers for timing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lit_amdet.encoders.openclip import OpenCLIPAdapter
from lit_amdet.encoders.tokenizers import clip_bpe_tokenizer

CLIP_VOCAB = 49408


def _text_kwargs(width: int, layers: int, heads: int, context: int) -> dict:
    return dict(
        vocab_size=CLIP_VOCAB,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=context,
    )


def build_hf_clip(path: str | Path, arch: str = "CLIPModel", width: int = 32, layers: int = 2, heads: int = 2,
                  context: int = 77, embed_dim: int = 24, image_size: int = 32, patch: int = 8,
                  seed: int = 0) -> Path:
    """A tiny HF CLIP (``CLIPModel``, ``CLIPTextModel`` or ``CLIPTextModelWithProjection``); context 248 = LongCLIP."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text = dict(_text_kwargs(width, layers, heads, context), projection_dim=embed_dim,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    if arch == "CLIPModel":
        vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=embed_dim)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim))
    elif arch == "CLIPTextModelWithProjection":
        model = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    elif arch == "CLIPTextModel":
        model = CLIPTextModel(CLIPTextConfig(**text))
    else:
        raise ValueError(f"unknown CLIP architecture {arch}")
    path = Path(path)
    model.save_pretrained(path)
    clip_bpe_tokenizer(model_max_length=context).save_pretrained(path)
    return path


def build_hf_siglip(path: str | Path, arch: str = "SiglipModel", width: int = 32, layers: int = 2, heads: int = 2,
                    context: int = 64, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """A tiny HF SigLIP with the CLIP BPE vocabulary (SigLIP's own sentencepiece model is not offline)."""
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipTextModel

    torch.manual_seed(seed)
    text = dict(_text_kwargs(width, layers, heads, context), projection_size=width,
                pad_token_id=49407, bos_token_id=49406, eos_token_id=49407)
    if arch == "SiglipModel":
        vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=heads, image_size=image_size, patch_size=patch)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    elif arch == "SiglipTextModel":
        model = SiglipTextModel(SiglipTextConfig(**text))
    else:
        raise ValueError(f"unknown SigLIP architecture {arch}")
    path = Path(path)
    model.save_pretrained(path)
    clip_bpe_tokenizer(model_max_length=context).save_pretrained(path)
    return path


def openclip_config(width: int = 32, layers: int = 2, heads: int = 2, context: int = 77, embed_dim: int = 24,
                    image_size: int = 32, patch: int = 8, custom_text: bool = False,
                    causal: bool = True, pool_type: str = "argmax") -> dict:
    text_cfg = dict(context_length=context, vocab_size=CLIP_VOCAB, width=width, heads=heads, layers=layers)
    if not causal:
        text_cfg.update(no_causal_mask=True)
    if pool_type != "argmax":
        text_cfg.update(pool_type=pool_type)
    cfg = dict(
        embed_dim=embed_dim,
        vision_cfg=dict(image_size=image_size, layers=layers, width=width, patch_size=patch, head_width=width // heads),
        text_cfg=text_cfg,
    )
    if custom_text:
        cfg["custom_text"] = True
    return cfg


def build_openclip(path: str | Path, seed: int = 0, **cfg_kwargs) -> Path:
    """A tiny open_clip ``CLIP`` (or ``CustomTextCLIP`` with ``custom_text=True``) ``local-dir`` folder."""
    import open_clip

    torch.manual_seed(seed)
    model_cfg = openclip_config(**cfg_kwargs)
    cfg = dict(model_cfg)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = cls(**cfg)
    context = model_cfg["text_cfg"]["context_length"]
    adapter = OpenCLIPAdapter(model, clip_bpe_tokenizer(pad_token="!", model_max_length=context), model_cfg)
    return adapter.save(path)


def build_hf_bert(path: str | Path, width: int = 32, layers: int = 2, heads: int = 2, context: int = 64,
                  seed: int = 0) -> Path:
    """A tiny HF ``BertModel`` using the MiniLM package's real uncased WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from lit_amdet.encoders.loading import builtin_path

    torch.manual_seed(seed)
    tok = BertTokenizerFast.from_pretrained(str(builtin_path("minilm")), local_files_only=True)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width,
                                 num_hidden_layers=layers, num_attention_heads=heads,
                                 max_position_embeddings=context))
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
