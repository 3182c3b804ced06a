"""The one interface that hides how each model family builds its text encoder.

Everything above this module (attacks, the AMDET scan, data scans) sees only
`TextEncoderAdapter`: tokenize, the embedding-layer output ``H``, the rest of the
encoder run from ``H`` (optionally with a block of pseudo-token vectors inserted
at a position), pooled/projected embeddings, per-layer attention maps, image
embeddings and native saving.
Widths, context lengths, special ids and masking come from each checkpoint's own
config, never from constants.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, ClassVar, Literal, Sequence

import torch
from torch import Tensor, nn

from lit_amdet.errors import LitAmdetError

Pooling = Literal["index", "last", "mean"]
#: the slot at each prompt's own end, just before its end token, where a vector is typed as a word would be
#: (`TextEncoderAdapter.encode_typed`) rather than spliced into H at a fixed position
END = "end"
Slot = int | Literal["end"]


@dataclass
class TokenBatch:
    """Tokenised prompts, padded to one length.

    ``attention_mask`` is what the model attends to (SigLIP attends to padding, so
    it is all ones there); ``token_mask`` marks real prompt tokens (specials
    included, padding excluded), which is what scores such as Sim_X average over.
    ``pool_index`` is the position the pooled embedding is read from (EOS for
    CLIP, the last position for SigLIP; unused for mean pooling).
    """

    input_ids: Tensor
    attention_mask: Tensor
    token_mask: Tensor
    pool_index: Tensor

    def to(self, device: torch.device | str) -> "TokenBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, idx) -> "TokenBatch":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def trimmed(self, length: int) -> "TokenBatch":
        """The first ``length`` positions (>= every prompt's real length, so pooled positions stay valid)."""
        return replace(self, input_ids=self.input_ids[:, :length], attention_mask=self.attention_mask[:, :length],
                       token_mask=self.token_mask[:, :length])


@dataclass
class EncoderOutput:
    """Final-layer token features and the pooled (projected) sentence embedding.

    The masks describe the sequence the features belong to, i.e. after any
    insertion of pseudo-tokens.
    """

    token_features: Tensor  # [B, L, width]
    pooled: Tensor  # [B, embed_dim]
    attention_mask: Tensor  # [B, L]
    token_mask: Tensor  # [B, L]
    pool_index: Tensor  # [B]


@dataclass
class InsertedSequence:
    """``H`` with a pseudo-token block spliced in, and the masks that go with it."""

    hidden: Tensor
    attention_mask: Tensor
    token_mask: Tensor
    pool_index: Tensor
    inserted_mask: Tensor  # [B, L] True at the inserted positions


def end_slots(token_mask: Tensor, k: int, length: int) -> Tensor:
    """Per prompt ([B, 1]), the slot before its end token (EOS, SEP), or, where ``k`` more tokens would overflow
    ``length``, the last slot that leaves the end token room (content tokens before it are then dropped)."""
    return (token_mask.long().sum(1, keepdim=True) - 1).clamp(min=1, max=length - 1 - k)


def insert_block(
    hidden: Tensor,
    batch: TokenBatch,
    block: Tensor | None,
    position: int | Tensor,
    keep_end_token: bool,
    pooling: Pooling,
) -> InsertedSequence:
    """Insert ``block`` ([k, W] or [B, k, W]) into ``hidden`` ([B, L, W]) before ``position`` (one for every
    prompt, or per prompt as [B, 1], as `end_slots` gives).

    The result is cut back to ``L``. Where the prompt would then overflow and the
    family pools from an end token (CLIP's EOS, BERT's SEP), content tokens just
    before that end token are dropped instead of the end token itself, so pooling
    still reads the right position. A zero-length block returns the input unchanged.
    """
    bsz, length, width = hidden.shape
    attn = batch.attention_mask.bool()
    tok = batch.token_mask.bool()
    if block is None or block.shape[-2] == 0:
        return InsertedSequence(hidden, attn, tok, batch.pool_index, torch.zeros_like(tok))
    if block.dim() == 2:
        block = block.unsqueeze(0)
    block = block.to(hidden.dtype).expand(bsz, -1, -1)
    k = block.shape[1]
    slots = torch.as_tensor(position)
    if not bool(((slots >= 0) & (slots < length)).all()):
        raise LitAmdetError(f"insertion position {position} is outside the context (length {length})")
    device = hidden.device
    j = torch.arange(length, device=device).expand(bsz, length)
    # Source index into cat([hidden, block]) for every output slot.
    src = j - k  # original position after the block
    if keep_end_token:
        n = attn.sum(1, keepdim=True)  # real length (prompt + specials)
        over = (n + k - length).clamp(min=0)
        src = torch.where((over > 0) & (src >= n - 1 - over), src + over, src)
    src = torch.where(j < position + k, length + (j - position), src)
    src = torch.where(j < position, j, src)
    full = torch.cat([hidden, block], dim=1)
    new_hidden = torch.gather(full, 1, src.unsqueeze(-1).expand(-1, -1, width))
    ones = torch.ones(bsz, k, dtype=torch.bool, device=device)
    new_attn = torch.gather(torch.cat([attn, ones], 1), 1, src)
    new_tok = torch.gather(torch.cat([tok, ones], 1), 1, src)
    inserted = src >= length
    if pooling == "index":
        hit = src == batch.pool_index.unsqueeze(1)
        if not bool(hit.any(1).all()):
            raise LitAmdetError("the pooled token was cut off by the insertion; use a shorter prompt length")
        pool_index = hit.int().argmax(1)
    elif pooling == "last":
        pool_index = torch.full((bsz,), length - 1, dtype=torch.long, device=device)
    else:
        pool_index = batch.pool_index
    return InsertedSequence(new_hidden, new_attn, new_tok, pool_index, inserted)


class TextEncoderAdapter(nn.Module, ABC):
    """A text encoder (and, where the checkpoint has one, its image tower) behind one interface.

    Subclasses wrap one native model (``self.model``) and implement four small
    hooks: ``embed``, ``run_layers``, ``project`` and, where relevant,
    ``encode_image``. Training a model through the adapter trains the native
    weights; ``save`` writes the family's native format.
    """

    family: ClassVar[str]
    pooling: ClassVar[Pooling] = "index"
    #: keep the last real token (EOS/SEP) when an insertion overflows the context
    keeps_end_token: ClassVar[bool] = True
    #: pad every prompt to the full context (SigLIP was trained that way)
    pads_to_context: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer, name: str = "encoder") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source_path: Path | None = None
        #: which text encoder of a pipeline or single file this is (``text_encoder_2``); None for a plain one
        self.component: str | None = None
        #: where a hub download came from (``{"hub_id": ..., "revision": ...}``); None for a local checkpoint
        self.origin: dict | None = None
        #: the class of the whole two-tower model whose text tower alone was loaded (``CLIPModel``); else None
        self.text_tower_of: str | None = None

    # ----- facts about the model -------------------------------------------------
    @property
    @abstractmethod
    def width(self) -> int:
        """Width of the token features (the residual stream)."""

    @property
    @abstractmethod
    def depth(self) -> int:
        """Number of transformer layers of the text tower (with ``width``, what a pass's activations scale with)."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Width of the pooled / projected sentence embedding."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Number of positions the encoder accepts."""

    @property
    @abstractmethod
    def causal(self) -> bool:
        """True when a token only attends to earlier tokens."""

    @property
    @abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The vocabulary embedding table."""

    @property
    def has_image_tower(self) -> bool:
        return False

    @property
    def special_token_ids(self) -> dict[str, int | None]:
        t = self.tokenizer
        return {
            "bos": t.bos_token_id if t.bos_token_id is not None else t.cls_token_id,
            "eos": t.eos_token_id if t.eos_token_id is not None else t.sep_token_id,
            "pad": t.pad_token_id,
        }

    @property
    def vocab_size(self) -> int:
        return self.token_embedding.num_embeddings

    # ----- tokenisation ----------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], max_length: int | None = None) -> TokenBatch:
        """Tokenise and pad; prompts longer than the context are truncated, EOS kept.

        ``max_length`` pads/truncates to fewer positions than the context (a
        shorter, cheaper sequence); ignored by families that pad to the context.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.context_length
        if max_length is not None and not self.pads_to_context:
            length = min(int(max_length), length)
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        ids = enc["input_ids"].long()
        token_mask = enc["attention_mask"].long()
        return self.batch_from_ids(ids, token_mask)

    def batch_from_ids(self, ids: Tensor, token_mask: Tensor) -> TokenBatch:
        """A `TokenBatch` of padded token ids and their real-token mask (the family's masking and pooling)."""
        attention_mask = torch.ones_like(token_mask) if self.pads_to_context else token_mask
        if self.pooling == "last":
            pool_index = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long)
        else:
            # last real token: EOS for CLIP-style tokenizers, SEP for BERT
            pool_index = token_mask.sum(1).long() - 1
        return TokenBatch(ids, attention_mask, token_mask, pool_index)

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    # ----- the split forward -----------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """Embedding-layer output H for ``input_ids`` (token + position embeddings): their table rows through
        `embed_vectors`, the one home of each family's embedding layer."""
        return self.embed_vectors(self.token_embedding(input_ids))

    @abstractmethod
    def embed_vectors(self, vectors: Tensor) -> Tensor:
        """The embedding layer from token-table vectors ([B, L, W]) at positions 0..L-1: ``embed`` after its
        table lookup (position embeddings added, and BERT's LayerNorm)."""

    @abstractmethod
    def run_layers(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """The encoder after the embedding layer, up to and including the final norm."""

    @abstractmethod
    def project(self, pooled: Tensor) -> Tensor:
        """Map the pooled token feature to the sentence embedding space."""

    @abstractmethod
    def attention_maps(self, batch: TokenBatch) -> Tensor:
        """Post-softmax self-attention probabilities of every layer: [B, layers, heads, L, L].

        Entry ``[b, l, h, i, j]`` is how much query position ``i`` attends to key
        position ``j``. Computed by the same ``embed`` + ``run_layers`` path as
        ``encode``, so the masking is the family's own (causal for CLIP, none over
        padding for SigLIP, padding masked for BERT).
        """

    def unused_parameter_names(self) -> list[str]:
        """Native parameters no path of the adapter uses (e.g. BERT's pooler): kept frozen in training."""
        return []

    def image_parameter_names(self) -> list[str]:
        """Native parameters of the image tower, its projection into the shared space included (none for a
        text-only model). Text-only training freezes them."""
        return []

    def logit_parameter_names(self) -> list[str]:
        """The contrastive head's learned temperature and bias (``logit_scale``, ``logit_bias``) where the native
        model has them; they belong to neither tower."""
        return self.parameter_names_under("logit_scale", "logit_bias")

    def text_projection_parameter_names(self) -> list[str]:
        """Native parameters of the map from the pooled token feature to the sentence embedding (`project`)."""
        return []

    def parameter_names_under(self, *modules: str) -> list[str]:
        """Native parameter names inside the given submodules of ``self.model`` (dotted paths, e.g.
        ``vision_model`` or ``text_model.head``), or equal to one of them (a bare parameter)."""
        return [n for n, _ in self.model.named_parameters()
                if any(n == m or n.startswith(m + ".") for m in modules)]

    def position_embedding(self, positions: Tensor) -> Tensor | None:
        """Position embedding added at ``positions`` inside ``embed`` (None if not additive)."""
        return None

    def encode_embeddings(
        self,
        hidden: Tensor,
        batch: TokenBatch,
        insert: Tensor | None = None,
        position: int = 1,
    ) -> EncoderOutput:
        """Run the encoder from H, optionally with ``insert`` ([k, W] or [B, k, W]) spliced in."""
        return self._run_sequence(insert_block(hidden, batch, insert, position, self.keeps_end_token, self.pooling))

    def encode_typed(self, vectors: Tensor, batch: TokenBatch, insert: Tensor) -> EncoderOutput:
        """Run the encoder with ``insert`` ([k, W] or [B, k, W], token-table vectors) typed at each prompt's end
        (`end_slots`) into ``vectors``, the prompts' token-table rows ([B, L, W]): every slot then takes the
        position embedding of where it is, the inserted ones included, and the tokens after them move on by k,
        exactly as when the words are typed there (`encode_embeddings` splices H, whose position parts stay)."""
        slots = end_slots(batch.token_mask, insert.shape[-2], vectors.shape[1]).to(vectors.device)
        seq = insert_block(vectors, batch, insert, slots, self.keeps_end_token, self.pooling)
        return self._run_sequence(replace(seq, hidden=self.embed_vectors(seq.hidden)))

    def _run_sequence(self, seq: InsertedSequence) -> EncoderOutput:
        feats = self.run_layers(seq.hidden, seq.attention_mask)
        pooled = self.pool(feats, seq.attention_mask, seq.pool_index)
        return EncoderOutput(feats, self.project(pooled), seq.attention_mask, seq.token_mask, seq.pool_index)

    def pool(self, features: Tensor, attention_mask: Tensor, pool_index: Tensor) -> Tensor:
        if self.pooling == "mean":
            m = attention_mask.to(features.dtype).unsqueeze(-1)
            return (features * m).sum(1) / m.sum(1).clamp(min=1e-9)
        rows = torch.arange(features.shape[0], device=features.device)
        return features[rows, pool_index.to(features.device)]

    def encode(self, batch: TokenBatch | Sequence[str], max_length: int | None = None) -> EncoderOutput:
        """Native-equivalent forward: tokens (or prompts) to features and pooled embedding."""
        if not isinstance(batch, TokenBatch):
            batch = self.tokenize(batch, max_length=max_length)
        batch = batch.to(self.device)
        return self.encode_embeddings(self.embed(batch.input_ids), batch)

    def encode_text(self, prompts: Sequence[str], normalize: bool = True) -> Tensor:
        pooled = self.encode(prompts).pooled
        return nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    # ----- images ----------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        raise LitAmdetError(f"{self.name} ({self.family}) has no image tower")

    def image_transform(self) -> Callable:
        """PIL image -> float tensor [3, H, W] as this model's image tower expects."""
        raise LitAmdetError(f"{self.name} ({self.family}) has no image tower")

    # ----- persistence -----------------------------------------------------------
    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the model (and tokenizer) in the family's native, safetensors format."""

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def describe(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "width": self.width,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "causal": self.causal,
            "pooling": self.pooling,
            "has_image_tower": self.has_image_tower,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **({"text_tower_of": self.text_tower_of} if self.text_tower_of else {}),
        }
