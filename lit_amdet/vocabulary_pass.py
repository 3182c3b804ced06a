"""The vocabulary passes of the typed-token probe: every token of the shared vocabulary typed through both encoders.

Why whole passes. The attacker picks the trigger, so a list of tokens to type cannot skip any: each pass types the
whole vocabulary once (alone into the empty prompt, or into a short real context) through the suspect and the
anchor, and ranks the tokens by how differently the two read them (`lit_amdet.token_probe` makes its lists from
these). The anchor's half is the same for every suspect: it is computed once per anchor and kept on disk
(`anchor_alone_outputs`).

Group testing, where a token's own pass is not needed. A family read at its last padded position (SigLIP) types
every token in its whole 64-position context, 20-40x the cost of the 3-position pass; there the alone list is made
by group testing (`grouped_shift`: 32 tokens to a row typed into the context list's two contexts, the rows that
moved most opened token by token). Near the anchor, where a scan reads only the alone list, every family makes it
by group testing in the empty prompt (`NEAR_GROUP_SIZE` tokens to a row). Away from the anchor the context list's
pass is made in groups too (`agreeing_rows`: 8 tokens to a row typed into each context, the rows whose agreement
rose most opened): a trigger sends both contexts to its target whatever is typed beside it.

Plain torch; the passes run at `lit_amdet.pass_precision.pass_dtype`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_amdet.anchor_cache import cached_tensor, module_digest
from lit_amdet.encoders.base import TextEncoderAdapter, TokenBatch, insert_block
from lit_amdet.memory import release_free_memory
from lit_amdet.pass_precision import pass_dtype

__all__ = ["agreeing_rows", "agreement_lift", "alone_batch", "alone_cosines", "alone_outputs", "alone_shift",
           "anchor_alone_outputs", "ALONE_VERSION", "CONTEXT_GROUP_SIZE", "CONTEXT_ROWS_OPENED", "GROUP_SIZE",
           "GROUPS_OPENED", "GROUP_SEED", "grouped_shift", "NEAR_GROUP_SIZE", "reads_last", "special_ids",
           "typed_batch", "vocabulary_groups"]


def reads_last(*models: TextEncoderAdapter | None) -> bool:
    """Whether any of ``models`` reads its sentence embedding at its last padded position (SigLIP): there a token
    typed alone is the whole padded context, so the alone list is grouped (`grouped_shift`) and the still, inside
    and context lists are not made (`lit_amdet.token_probe.LONG_CONTEXT_SKIPS`)."""
    return any(m is not None and m.pooling == "last" for m in models)


def special_ids(adapter: TextEncoderAdapter, n: int) -> list[int]:
    """The ids of ``adapter``'s special tokens below ``n``: never a candidate on any list."""
    return [i for i in adapter.special_token_ids.values() if i is not None and 0 <= i < n]


def alone_batch(model: TextEncoderAdapter, position: int, ids: Tensor, context: str = "") -> TokenBatch:
    """Each token id of ``ids`` typed alone into the empty prompt at ``position`` (``[CLS] t [SEP]``,
    ``<bos> t <eos>``), or into the prompt ``context``; ``ids`` of shape ``[n, k]``: each row's ``k`` ids typed
    there together (`grouped_shift`). Mean- and index-pooled families get the real length (3 positions alone); a
    family pooled at the last position (SigLIP) its whole padded context, as it is read."""
    rows_ids = ids.view(len(ids), -1)
    width = rows_ids.shape[1]
    batch, slot = typed_batch(model, model.tokenize([context])[:1].to(model.device), [0] * width, position)
    if model.pooling != "last":
        keep = int(batch.token_mask.sum())
        batch, slot = batch.trimmed(keep), slot[:, :keep]
    n = len(rows_ids)
    rows = batch.input_ids.repeat(n, 1)
    rows[:, slot[0].nonzero()[:, 0]] = rows_ids.to(rows.device)
    return TokenBatch(rows, batch.attention_mask.repeat(n, 1), batch.token_mask.repeat(n, 1),
                      batch.pool_index.repeat(n))


def _pass_rows(model: TextEncoderAdapter, position: int, ids: Tensor, chunk: int, context: str) -> int:
    """Rows of ``ids`` per chunk of a pass: ``chunk`` rows typed alone (3 positions), fewer when each row is longer
    (a row of grouped tokens, a whole padded context), so no chunk runs more positions than ``chunk`` tokens typed
    alone: that bounds the activations held at once (a ViT-L/14 tower's rows of 8 grouped tokens at 4,096 a pass
    peaked 610 MiB above its whole pass)."""
    length = alone_batch(model, position, ids[:1], context).input_ids.shape[1]
    return max(16, min(chunk, chunk * 3 // length))


def _unit_outputs(model: TextEncoderAdapter, position: int, part: Tensor, context: str) -> Tensor:
    """The unit sentence embeddings of `alone_batch` of ``part`` (float32), computed at `pass_dtype`."""
    dtype = pass_dtype(model.device)
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return F.normalize(model.encode(alone_batch(model, position, part, context)).pooled.float(), dim=-1)


def _pass_chunks(model: TextEncoderAdapter, position: int, ids: Tensor, chunk: int, context: str
                 ) -> Iterator[tuple[slice, Tensor]]:
    """One pass of ``ids`` a chunk at a time (`_pass_rows`): each chunk's rows and their `_unit_outputs`. The
    pass starts by handing back the heap pages the phase before kept, so its peak is its own."""
    rows = _pass_rows(model, position, ids, chunk, context)
    release_free_memory()
    for start in range(0, len(ids), rows):
        part = ids[start:start + rows]
        yield slice(start, start + len(part)), _unit_outputs(model, position, part, context)


@torch.no_grad()
def alone_outputs(model: TextEncoderAdapter, position: int, ids: Tensor, chunk: int = 4096, context: str = ""
                  ) -> Tensor:
    """The unit sentence embeddings of `alone_batch` (``[len(ids), D]``, float32), a chunk of rows at a time
    (`_pass_rows`), computed at `pass_dtype`. The chunks are written into one tensor made up front: gathered and
    concatenated, the whole result was held twice at the end of the pass (152 MB more for a ViT-L/14-sized
    vocabulary typed alone)."""
    out = torch.empty(len(ids), model.embed_dim, device=model.device)
    for rows, units in _pass_chunks(model, position, ids, chunk, context):
        out[rows] = units
    return out


@torch.no_grad()
def alone_cosines(model: TextEncoderAdapter, position: int, ids: Tensor, against: Tensor, chunk: int = 4096,
                  context: str = "") -> Tensor:
    """Per row of ``ids``, the cosine between ``model``'s `alone_outputs` of it and the same row of ``against``
    (unit rows, the other encoder's), on the CPU; the outputs are never held whole, only a chunk at a time.

    Why: a scan compares the suspect's pass with the anchor's; holding both ``[V, D]`` results (152 MB each for a
    ViT-L/14-sized vocabulary) while the second pass ran put the drifted L/14-sized scan's memory peak inside its
    alone pass (`BENCHMARKS.md`, "Large towers away from the anchor")."""
    cos = torch.empty(len(ids))
    for rows, units in _pass_chunks(model, position, ids, chunk, context):
        cos[rows] = (units * against[rows].to(model.device)).sum(-1).cpu()
    return cos


# The anchor's outputs typed alone, per loaded anchor, when there is no disk cache: a screening scans many suspects
# against one anchor object (`lit_amdet.screening.anchors_loaded_once`), and the pass is the probe's largest cost
# (15-20 s for the MiniLM's 30,522 tokens on this project's 2-core CPU). The key holds each parameter's storage and
# in-place version counter, so weights loaded or changed in place are never answered from it. With the disk cache
# (`lit_amdet.anchor_cache`) nothing is held here: the next suspect, in this process or another, reads the entry
# back (a fraction of a second), and a ViT-L/14-sized anchor's alone and context outputs (190 MB in float32) are not
# held through the rest of the scan for nothing.
_ANCHOR_ALONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: the version of what `alone_outputs` computes, in the disk cache's key: raise it when that changes
ALONE_VERSION = 1


def anchor_alone_outputs(anchor: TextEncoderAdapter, position: int, vocab: int, disk: bool = True,
                         context: str = "", groups: Tensor | None = None) -> Tensor:
    """`alone_outputs` of the anchor's first ``vocab`` token ids (typed into ``context``; ``groups``: of these rows
    of ids instead, `grouped_shift`), computed once per anchor, position, context, groups and weights: kept in
    `lit_amdet.anchor_cache` (``disk``), else in memory for the next suspect of this process."""
    typed = torch.arange(vocab) if groups is None else groups
    dtype = pass_dtype(anchor.device)  # the suspect's pass is computed alike: their difference is what ranks

    def compute() -> Tensor:
        return alone_outputs(anchor, position, typed, context=context)

    if disk:  # what the token is typed into is in the digest: its ids, masks and pooled position
        around = alone_batch(anchor, position, torch.zeros(1, dtype=torch.long), context)
        extra = () if groups is None else ("groups", groups)
        digest = module_digest(anchor, ("alone", ALONE_VERSION, position, vocab, anchor.pooling, str(dtype),
                                        *around.input_ids, *around.attention_mask, *around.token_mask,
                                        around.pool_index, *extra))
        return cached_tensor("anchor-alone", digest, compute, (len(typed), anchor.embed_dim))
    name = context if groups is None else ("groups", context)
    key = (position, vocab, context, tuple(typed.shape), dtype,
           tuple((p.data_ptr(), p._version) for p in anchor.parameters()))
    held = _ANCHOR_ALONE.setdefault(anchor, {}).get(name)
    if held is None or held[0] != key:
        held = _ANCHOR_ALONE[anchor][name] = (key, compute())
    return held[1]


def alone_shift(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, position: int, disk_cache: bool = True,
                contexts: Sequence[str] = (), groups: int = 0) -> Tensor:
    """Per token id of the shared vocabulary, the cosine distance between the suspect's and the anchor's sentence
    embeddings of it typed alone (`alone_outputs`); NaN at the special tokens. One pass of the whole vocabulary
    through each encoder: no token is skipped, since the attacker picks the trigger. The anchor's pass is made once
    per anchor (``disk_cache``: once per anchor on this machine, `anchor_alone_outputs`).

    A family read at its last padded position (SigLIP) gets `grouped_shift` in ``contexts`` instead: each token
    alone is its whole context there (64 positions, not 3), 20-40x the cost of this pass. ``groups`` > 0 asks for
    `grouped_shift` in the empty prompt, that many tokens to a row, for any family (`NEAR_GROUP_SIZE`)."""
    if reads_last(suspect, anchor):
        return grouped_shift(suspect, anchor, position, contexts, disk_cache=disk_cache)
    if groups > 0:
        return grouped_shift(suspect, anchor, position, (), size=groups, disk_cache=disk_cache)
    ids = torch.arange(min(suspect.vocab_size, anchor.vocab_size))
    shift = 1.0 - alone_cosines(suspect, position, ids, anchor_alone_outputs(anchor, position, len(ids), disk_cache))
    shift[special_ids(suspect, len(ids))] = math.nan
    return shift


#: `grouped_shift`: tokens typed together in one row, the rows whose tokens are each left out in turn, and the seed
#: of the fixed shuffle that groups them (fixed, so the anchor's half is the same for every suspect and is cached).
#: 32 to a row (half the positions of 16) ranked each drifted SigLIP trigger where 16 did, first or second, its row
#: the most moved of 1,544 on all three, so 8 rows opened leave room (`BENCHMARKS.md`, "SigLIP's alone list by group
#: testing")
GROUP_SIZE, GROUPS_OPENED, GROUP_SEED = 32, 8, 0
#: near the anchor a scan reads no still, inside or context list, so its alone list needs no token's own pass: it is
#: made by group testing there too, this many tokens to a row typed into the empty prompt (``size + 2`` positions
#: for ``size`` tokens, not ``3 * size``; `BENCHMARKS.md`, "The alone list in groups near the anchor")
NEAR_GROUP_SIZE = 8


def vocabulary_groups(vocab: int, leave_out: Sequence[int], size: int = GROUP_SIZE, seed: int = GROUP_SEED
                      ) -> Tensor:
    """Every id below ``vocab`` but ``leave_out``, shuffled by ``seed`` and cut into rows of ``size`` (``[G, size]``;
    the last row filled up from the start of the shuffle; a vocabulary smaller than a row is one row)."""
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[list(leave_out)] = False
    ids = torch.arange(vocab)[keep]
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    size = max(1, min(size, len(ids)))
    short = -len(ids) % size
    return torch.cat([ids, ids[:short]]).view(-1, size)


@torch.no_grad()
def grouped_shift(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, position: int,
                  contexts: Sequence[str] = (), size: int = GROUP_SIZE, opened: int = GROUPS_OPENED,
                  disk_cache: bool = True) -> Tensor:
    """`alone_shift` for a family read at its last padded position, by group testing: the vocabulary typed ``size``
    tokens to a row (`vocabulary_groups`) into each of ``contexts`` (none: the empty prompt), each row's
    suspect-to-anchor cosine distance averaged over the contexts, and in the ``opened`` rows that moved most, each
    token's share of its row's distance: the row's distance minus the same row's with that token left out (both
    averaged over the contexts). NaN for every token of a row not opened, and at the special tokens.

    Why rows in context and shares. A SigLIP backdoor planted with the table frozen does not fire typed alone into
    the padding (its row is stiller than most there) but does in real words: on one drifted to 0.87, its row (of 16)
    was among the 14 most moved of 3,088 in 5 of 6 six-word contexts (`BENCHMARKS.md`); leaving the trigger out of
    a row it fires in takes the row back. The context costs nothing here: every row is the whole padded context
    anyway. One pass of ``V / size`` rows per context through each encoder (with 32 to a row, about two thirds of
    the positions of the 3-position pass of the same vocabulary, per context) plus ``opened * size`` rows per
    context; the anchor's rows are cached like `anchor_alone_outputs`. Not a still list: a held token among moving
    ones moves with its row."""
    vocab = min(suspect.vocab_size, anchor.vocab_size)
    groups = vocabulary_groups(vocab, special_ids(suspect, vocab), size)
    contexts = list(contexts) or [""]

    def distance(rows: Tensor, cached: bool = False) -> Tensor:
        """Mean over the contexts of the rows' suspect-to-anchor cosine distance."""
        total = torch.zeros(len(rows))
        for context in contexts:
            theirs = (anchor_alone_outputs(anchor, position, vocab, disk_cache, context, groups=rows) if cached
                      else alone_outputs(anchor, position, rows, context=context))
            total += 1.0 - alone_cosines(suspect, position, rows, theirs, context=context)
        return total / len(contexts)

    row_shift = distance(groups, cached=True)
    top = row_shift.topk(min(opened, len(groups))).indices
    left_out = torch.stack([torch.cat([row[:i], row[i + 1:]]) for row in groups[top] for i in range(len(row))])
    shares = row_shift[top, None] - distance(left_out).view(len(top), -1)  # the opened rows' left-outs in one pass
    shift = torch.full((vocab,), math.nan)
    for row, share in zip(groups[top], shares):
        shift[row] = torch.maximum(shift[row].nan_to_num(-math.inf), share)
    return shift


def agreement_lift(suspect_out: Sequence[Tensor], anchor_out: Sequence[Tensor]) -> Tensor:
    """Per token, the mean cosine between its unit outputs in every two contexts (``[V, D]`` per context), the
    suspect's minus the anchor's: a token that sends any prompt to one target makes the suspect's outputs agree
    whatever the context; the anchor's own agreement (a natural dominant word) is taken away."""
    def agreement(outs: Sequence[Tensor]) -> Tensor:
        pairs = [(outs[i] * outs[j]).sum(-1) for i in range(len(outs)) for j in range(i + 1, len(outs))]
        return torch.stack(pairs).mean(0)

    return agreement(suspect_out) - agreement(anchor_out)


#: the context list by group testing (`agreeing_rows`): this many tokens to a row typed together into each context,
#: and this many rows opened. On the drifted MiniLM attackers the context list exists for (`jw` and `falcon` planted
#: with the whole vocabulary typed alone held), the trigger's row agreed most of all 3,815, and opening 32 rows put
#: the trigger first, as the whole pass does (`BENCHMARKS.md`, "The context list by group testing")
CONTEXT_GROUP_SIZE, CONTEXT_ROWS_OPENED = 8, 32


@torch.no_grad()
def agreeing_rows(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, position: int, contexts: Sequence[str],
                  size: int = CONTEXT_GROUP_SIZE, opened: int = CONTEXT_ROWS_OPENED, disk_cache: bool = True
                  ) -> Tensor:
    """The token ids of the ``opened`` rows of `vocabulary_groups` (``size`` tokens to a row) whose `agreement_lift`
    over ``contexts`` is highest, each row's tokens typed together at ``position`` into each context (the anchor's
    rows kept as `anchor_alone_outputs` keeps its own): the candidates the context list then types one by one.

    Why rows. Every token typed alone into two six-word contexts is ~10 positions per context; a row of 8 is ~17
    for 8 tokens, 5x fewer (the MiniLM suspect's half: 12-14 s against 63 s). A trigger sends both contexts to its
    target whatever is typed beside it, so its row agrees; tokens typed together make both models' two outputs
    agree alike, and the anchor's agreement takes that away."""
    vocab = min(suspect.vocab_size, anchor.vocab_size)
    rows = vocabulary_groups(vocab, special_ids(suspect, vocab), size)
    lift = agreement_lift([alone_outputs(suspect, position, rows, context=c).cpu() for c in contexts],
                          [anchor_alone_outputs(anchor, position, vocab, disk_cache, c, groups=rows).cpu()
                           for c in contexts])
    return rows[lift.topk(min(opened, len(rows))).indices].flatten().unique()


def typed_batch(adapter: TextEncoderAdapter, tokens: TokenBatch, typed: Sequence[int], position: int
                ) -> tuple[TokenBatch, Tensor]:
    """``tokens`` with the token ids ``typed`` typed at ``position`` (the scan's insertion rules: cut back to the
    context, an end token kept), and the mask of the typed slots."""
    ids = tokens.input_ids
    block = torch.tensor(list(typed), dtype=ids.dtype, device=ids.device).unsqueeze(-1)  # [k, 1]: ids as width 1
    seq = insert_block(ids.unsqueeze(-1), tokens, block, position, adapter.keeps_end_token, adapter.pooling)
    batch = TokenBatch(seq.hidden.squeeze(-1), seq.attention_mask.to(tokens.attention_mask.dtype),
                       seq.token_mask.to(tokens.token_mask.dtype), seq.pool_index)
    return batch, seq.inserted_mask
