"""Encoder adapters: one interface over CLIP, LongCLIP, SigLIP, open_clip and BERT text encoders."""

from lit_amdet.encoders.base import END, EncoderOutput, Slot, TextEncoderAdapter, TokenBatch, end_slots, insert_block
from lit_amdet.encoders.hf import BertAdapter, CLIPAdapter, SiglipAdapter
from lit_amdet.encoders.loading import check_same_architecture, load_encoder, text_encoder_components
from lit_amdet.encoders.openclip import OpenCLIPAdapter
from lit_amdet.encoders.tokenizers import clip_bpe_tokenizer
from lit_amdet.encoders.weights import file_sha256, read_state_dict

__all__ = [
    "END",
    "BertAdapter",
    "CLIPAdapter",
    "EncoderOutput",
    "OpenCLIPAdapter",
    "Slot",
    "SiglipAdapter",
    "TextEncoderAdapter",
    "TokenBatch",
    "check_same_architecture",
    "clip_bpe_tokenizer",
    "end_slots",
    "file_sha256",
    "insert_block",
    "load_encoder",
    "read_state_dict",
    "text_encoder_components",
]
