"""Tokenizers that work offline.

The only real BPE vocabulary on a machine without a model hub is the one
open_clip ships. It is the OpenAI CLIP vocabulary (49,408 tokens), so a
transformers ``CLIPTokenizer`` built from it tokenises exactly as the public CLIP
checkpoints do.
"""

from __future__ import annotations

import gzip
from functools import lru_cache

from transformers import CLIPTokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def _clip_bpe_tables() -> tuple[dict[str, int], list[str]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Same slice as open_clip's SimpleTokenizer: header line, then 48,894 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_bpe_tokenizer(pad_token: str = CLIP_EOS, model_max_length: int = 77) -> CLIPTokenizer:
    """A transformers CLIP tokenizer from open_clip's bundled BPE vocabulary.

    HF CLIP checkpoints pad with the EOS token (id 49407); open_clip pads with id 0,
    which is the token ``"!"`` — pass ``pad_token="!"`` for that convention.
    """
    vocab, merges = _clip_bpe_tables()
    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=pad_token,
    )
    tok.model_max_length = model_max_length
    return tok
