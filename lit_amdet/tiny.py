"""Small randomly initialised models of every supported family, written in their native format.

For plumbing tests and timing only: a random encoder says nothing about
detection (its clean prompts already look "assimilated"). The sizes are
arguments, so the same builders make ViT-L/14-sized text towers for timing.
"""

from __future__ import annotations

from pathlib import Path

from lit_amdet.encoders.architectures import EncoderSpec


def build(path: str | Path, **spec) -> Path:
    """Build ``EncoderSpec(**spec)`` and save it natively at ``path``."""
    return EncoderSpec(**spec).build().save(path)


def build_hf_clip(path: str | Path, arch: str = "CLIPModel", context: int = 77, **spec) -> Path:
    """A tiny HF CLIP (``CLIPModel``, ``CLIPTextModel`` or ``CLIPTextModelWithProjection``); context 248 = LongCLIP."""
    return build(path, family="clip" if context <= 77 else "longclip", arch=arch, context=context, **spec)


def build_hf_siglip(path: str | Path, arch: str = "SiglipModel", **spec) -> Path:
    """A tiny HF SigLIP with the CLIP BPE vocabulary (SigLIP's own sentencepiece model is not offline)."""
    return build(path, family="siglip", arch=arch, **spec)


def build_openclip(path: str | Path, custom_text: bool = False, **spec) -> Path:
    """A tiny open_clip ``CLIP`` (or ``CustomTextCLIP``) ``local-dir`` folder."""
    return build(path, family="open_clip", arch="CustomTextCLIP" if custom_text else "CLIP", **spec)


def build_hf_bert(path: str | Path, **spec) -> Path:
    """A tiny HF ``BertModel`` using the MiniLM package's real uncased WordPiece vocabulary."""
    return build(path, family="bert", **spec)


def openclip_config(**spec) -> dict:
    """The open_clip ``model_cfg`` of a tiny model (for registering it under a name)."""
    return EncoderSpec(family="open_clip", **spec).open_clip_config()
