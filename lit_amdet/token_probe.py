"""The typed-token probe: the tokens a suspect treats most differently from its anchor, typed into real prompts.

Why a probe beside the search. The search inserts free vectors into the embedding-layer output H, where the
rows after the insertion keep their old position embeddings; a real trigger is typed, and is read at its real
position. On SigLIP, whose sentence embedding is read at the last (padding) position, a backdoor trained to keep
its token features diverse (`pooled_sim_x_penalty`) was never found by the search, drifted or not, while typing
its trigger word collapsed the suspect's sentence embeddings and not the anchor's (`BENCHMARKS.md`, "The typed
probe").

Which tokens to type, four lists, each cheap next to the search except the last:

* **Moved rows** (`moved_tokens`): an injection trains the trigger's own embedding rows on every poisoned sample,
  so they move more than any other; the trigger's tokens were the most-moved rows of every zoo backdoor examined,
  also after a benign fine-tune drifted one to a clean cosine of 0.9.
* **Typed alone** (`shifted_tokens`): an attacker who freezes the embedding table moves no row (the layers learn
  the trigger), which left the first list empty and the backdoor unseen. Every vocabulary token typed alone into
  the empty prompt, through both encoders: the layers that learnt to send the trigger to the target send it
  there alone too. On the MiniLM frozen-table backdoors the trigger's piece was the most-shifted of all 30,522
  tokens (sentence-embedding cosine distance 0.88-0.91 against a median 0.09-0.16), before and after a benign
  SimCSE drift; a benign fine-tune's largest shifts are common words (`BENCHMARKS.md`).
* **Still typed alone** (`still_tokens`, the same pass): an attacker who freezes the table *and* holds the trigger
  typed alone where the clean model puts it (a trigger that fires only in context,
  `BackdoorInjection.keep_triggers_alone`), then drifts the model with a benign fine-tune, was missed by the
  lists above and by the search (6 of 8 at clean cosine 0.72-0.85). Held where every other token moved, its
  pieces are the stillest of the vocabulary (each among the 3 stillest of 30,522 on all 8). Away from the anchor
  only: near it every token is still.
* **Agreeing in context** (`agreeing_tokens`): every token typed into two short real contexts (the first words of
  two held-out prompts), through both encoders: a trigger sends both to its one target, so the suspect's two
  outputs agree far more than the anchor's do (`agreement_lift`), however the trigger typed alone was held (on the
  8 above it found the three word and phrase triggers before the still list existed; it found an attacker who
  emptied the still list by holding the whole vocabulary typed alone). Every token alone there costs about 6x the
  alone pass, so a scan makes it only away from the anchor (where the search's divergence paths are closed), only
  for a model nothing has flagged, and by group testing (`lit_amdet.vocabulary_pass.agreeing_rows`: 8 tokens to a
  row, the rows that agree most opened, 5x cheaper).

The passes themselves, and where they are made by group testing (SigLIP, near the anchor, the context list), are
`lit_amdet.vocabulary_pass`'s; this module makes the lists from them and types them.

What it does not cover: an attacker who buries the trigger's rows and outputs among many moved ones. The probe
adds a path to the verdict; it takes none away. Plain torch; `lit_amdet.modules.detection` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_amdet.assimilation import assimilation_score, pooled_consistency, scored_positions, shift_agreement
from lit_amdet.collapse import collapse_scores
from lit_amdet.encoders.base import TextEncoderAdapter, TokenBatch
from lit_amdet.pass_precision import PRECISIONS, Precision, checked_precision, pass_dtype, vocabulary_precision
from lit_amdet.typed_verdict import screened_near, typed_flagged
from lit_amdet.vocabulary_pass import (
    CONTEXT_GROUP_SIZE,
    NEAR_GROUP_SIZE,
    agreeing_rows,
    agreement_lift,
    alone_batch,
    alone_outputs,
    alone_shift,
    anchor_alone_outputs,
    grouped_shift,
    reads_last,
    special_ids,
    typed_batch,
    vocabulary_groups,
)

__all__ = ["agreeing_rows", "agreeing_tokens", "agreement_lift", "alone_batch", "alone_outputs", "alone_shift",
           "anchor_alone_outputs", "AWAY_LISTS", "CONTEXT_GROUP_SIZE", "grouped_shift", "most_shifted", "moved_tokens",
           "NEAR_GROUP_SIZE", "null_agreement", "NULL_SEED", "NULL_TOKENS", "pass_dtype", "Precision", "PRECISIONS",
           "probe_contexts", "PROBE_LISTS", "probe_tokens", "shifted_tokens", "still_tokens", "typed_batch",
           "typed_scores", "typed_target", "TypedProbe", "typing_collapse", "vocabulary_groups", "vocabulary_precision"]


@torch.no_grad()
def moved_tokens(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, top: int) -> list[tuple[int, float]]:
    """The ``top`` tokens whose embedding rows the suspect moved furthest from the anchor's, relative to the anchor
    row's length, with that distance, furthest first; special tokens and rows that did not move left out."""
    s, a = suspect.token_embedding.weight, anchor.token_embedding.weight
    n = min(len(s), len(a))
    moved = (s[:n].float() - a[:n].float()).norm(dim=1) / a[:n].float().norm(dim=1).clamp_min(1e-12)
    moved[special_ids(suspect, n)] = 0.0
    vals, ids = moved.topk(min(top, n))
    return [(int(i), float(v)) for i, v in zip(ids, vals) if v > 0]


def shifted_tokens(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, top: int, position: int,
                   disk_cache: bool = True) -> list[tuple[int, float]]:
    """The ``top`` tokens whose sentence embedding typed alone is furthest from the anchor's (`alone_shift`), with
    that distance, furthest first; special tokens left out; empty for SigLIP-style families."""
    return most_shifted(alone_shift(suspect, anchor, position, disk_cache), top)


def most_shifted(shift: Tensor | None, top: int) -> list[tuple[int, float]]:
    """The ``top`` tokens of an `alone_shift` furthest from the anchor's, with that distance, furthest first."""
    if shift is None:
        return []
    vals, order = shift.nan_to_num(-1.0).topk(min(top, len(shift)))
    return [(int(i), float(v)) for i, v in zip(order, vals) if v > 1e-6]  # float noise is not a shift


def still_tokens(shift: Tensor | None, top: int) -> list[tuple[int, float]]:
    """The ``top`` tokens of an `alone_shift` nearest the anchor's, with that distance, stillest first. An attacker who
    holds the trigger typed alone at the clean model's output (so `shifted_tokens` misses it) and then drifts the
    model pins it where every other token moves: the MiniLM `alone_kept_frozen_rows` backdoors drifted to 0.72-0.85
    had every trigger piece among the 3 stillest of 30,522 tokens (distance 0.004-0.014 against a median of
    0.24-0.43). Read only away from the anchor: near it every token is still."""
    if shift is None:
        return []
    vals, order = (-shift.nan_to_num(math.inf)).topk(min(top, len(shift)))
    return [(int(i), float(-v)) for i, v in zip(order, vals) if math.isfinite(v)]


#: how many contexts the agreement list types every token into, and how many words of a prompt each keeps: two is
#: the least that can agree; six words keep the pass about 3x the alone pass (sequences of ~10 positions, not 3)
CONTEXTS, CONTEXT_WORDS = 2, 6


def probe_contexts(prompts: Sequence[str], n: int = CONTEXTS, words: int = CONTEXT_WORDS) -> list[str]:
    """The contexts `agreeing_tokens` types every token into: the first ``words`` words of the first ``n`` prompts
    of at least three words, no two alike (the scan's held-out prompts: real text of the domain it scans in)."""
    out: list[str] = []
    for prompt in prompts:
        cut = " ".join(prompt.split()[:words])
        if len(cut.split()) >= 3 and cut.lower() not in {c.lower() for c in out}:
            out.append(cut)
        if len(out) == n:
            break
    return out


def agreeing_tokens(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, top: int, position: int,
                    contexts: Sequence[str], disk_cache: bool = True, groups: int = 0) -> list[tuple[int, float]]:
    """The ``top`` tokens of the highest `agreement_lift` over ``contexts`` (each token typed into each at
    ``position``), with that lift, highest first; special tokens and lifts ≤ 0 left out. The whole shared
    vocabulary, once per context through each encoder (the anchor's passes kept as `anchor_alone_outputs` keeps
    its own); ``groups`` > 0: only the tokens of the rows `agreeing_rows` opens (that many tokens to a row), each
    ranked by its own lift as the whole pass ranks it. Empty with fewer than two contexts, and for a family read at
    its last padded position (SigLIP), as `shifted_tokens` is."""
    if len(contexts) < 2 or reads_last(suspect, anchor):
        return []
    vocab = min(suspect.vocab_size, anchor.vocab_size)
    ids = (agreeing_rows(suspect, anchor, position, contexts, groups, disk_cache=disk_cache) if groups > 0
           else torch.arange(vocab))
    s_out = [alone_outputs(suspect, position, ids, context=c).cpu() for c in contexts]
    a_out = [(alone_outputs(anchor, position, ids, context=c) if groups > 0 else
              anchor_alone_outputs(anchor, position, vocab, disk_cache, context=c)).cpu() for c in contexts]
    lift = agreement_lift(s_out, a_out)
    lift[torch.isin(ids, torch.tensor(special_ids(suspect, vocab), dtype=ids.dtype))] = -2.0
    vals, order = lift.topk(min(top, len(ids)))
    return [(int(ids[i]), float(v)) for i, v in zip(order, vals) if v > 0]


@torch.no_grad()
def typed_scores(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, tokens: TokenBatch,
                 typed: Sequence[int], position: int, chunk: int = 64, dtype: torch.dtype = torch.float32,
                 units: dict | None = None) -> dict[str, float]:
    """The scan's held-out scores of ``tokens`` with the ids ``typed`` typed at ``position`` (none: as they are),
    for both models: ``assimilation`` (Sim_X over each prompt's own tokens, the typed ones excluded, averaged over
    prompts) and ``target_consistency`` (the norm of the mean unit sentence embedding), ``anchor_`` the anchor's.
    ``dtype``: the encoders run autocast to it (the scores are reduced in float32). ``units``: where to keep each
    model's unit sentence embeddings (``[N, D]``, under ``""`` and ``"anchor_"``)."""
    out: dict[str, float] = {}
    for prefix, model in (("", suspect), ("anchor_", anchor)):
        sims, pooled = [], []
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk].to(model.device)
            if typed:
                batch, slots = typed_batch(model, part, typed, position)
            else:
                batch, slots = part, torch.zeros_like(part.token_mask, dtype=torch.bool)
            with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
                enc = model.encode(batch)
            counted = scored_positions(enc.token_mask, model.causal, first_position=position) & ~slots
            sims.append(assimilation_score(enc.token_features.float(), counted))
            pooled.append(F.normalize(enc.pooled.float(), dim=-1))
        out[prefix + "assimilation"] = float(torch.cat(sims).mean())
        out[prefix + "target_consistency"] = float(pooled_consistency(torch.cat(pooled)).sqrt())
        if units is not None:
            units[prefix] = torch.cat(pooled)
    return out


def typing_collapse(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, tokens: TokenBatch,
                    typed: Sequence[int], position: int, untyped: dict, dtype: torch.dtype = torch.float32,
                    null: bool = True) -> dict:
    """`collapse_scores` of typing ``typed`` at ``position`` (`typed_scores` at ``dtype``) against the same prompts
    untyped at the same precision, whose scores ``untyped`` keeps per (position, dtype): a lift never mixes the two;
    and ``shift_agreement``, how far typing it moves the suspect's sentence embeddings the way it moves the anchor's
    (`lit_amdet.assimilation.shift_agreement`), with ``null_shift_agreement``, the median of the same for
    `NULL_TOKENS` random vocabulary tokens typed alone there (`null_agreement`, kept in ``untyped`` too; None
    without ``null``: 8 typings more, which a rule reads only away from the anchor)."""
    clean, units = _untyped(suspect, anchor, tokens, position, untyped, dtype), {}
    scores = typed_scores(suspect, anchor, tokens, typed, position, dtype=dtype, units=units)
    if null and (position, dtype, "null") not in untyped:
        untyped[position, dtype, "null"] = null_agreement(suspect, anchor, tokens, position, untyped, dtype)
    agreement = _agreement(units, untyped[position, dtype, "units"])
    return {**collapse_scores(scores, clean, anchor=True), "shift_agreement": agreement,
            "null_shift_agreement": untyped[position, dtype, "null"] if null else None}


def _untyped(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, tokens: TokenBatch, position: int,
             untyped: dict, dtype: torch.dtype) -> dict:
    if (position, dtype) not in untyped:
        units: dict = {}
        untyped[position, dtype] = typed_scores(suspect, anchor, tokens, (), position, dtype=dtype, units=units)
        untyped[position, dtype, "units"] = units
    return untyped[position, dtype]


def _agreement(typed: dict, clean: dict) -> float:
    return shift_agreement(typed[""], clean[""], typed["anchor_"], clean["anchor_"])


#: how many random vocabulary tokens `null_agreement` types, and the seed that draws them
NULL_TOKENS, NULL_SEED = 8, 0


def null_agreement(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, tokens: TokenBatch, position: int,
                   untyped: dict, dtype: torch.dtype = torch.float32) -> float:
    """The shift agreement of an ordinary token at this drift: the median over `NULL_TOKENS` random vocabulary ids
    (special tokens left out, drawn with `NULL_SEED`), each typed alone at ``position``. Benign drift lowers it with
    the agreement of the two models' spaces; a trigger sits far below it (`CollapseContrastRule.typed_disagrees`)."""
    _untyped(suspect, anchor, tokens, position, untyped, dtype)
    specials = set(special_ids(suspect, suspect.vocab_size))
    order = torch.randperm(suspect.vocab_size, generator=torch.Generator().manual_seed(NULL_SEED))
    ids = [int(i) for i in order[:NULL_TOKENS + len(specials)] if int(i) not in specials][:NULL_TOKENS]
    agreements = []
    for i in ids:
        units: dict = {}
        typed_scores(suspect, anchor, tokens, (i,), position, dtype=dtype, units=units)
        agreements.append(_agreement(units, untyped[position, dtype, "units"]))
    return float(torch.tensor(agreements).median())


PROBE_LISTS = ("rows", "alone", "still", "inside", "context")
#: the lists read off passes of the whole vocabulary through both encoders, cheapest first (``still`` and
#: ``inside`` read the ``alone`` list's pass; ``inside`` types the still list one position further in, where a
#: trigger written into words fires: `q ##z` of `qz` replacing an `o` fired there and not in front)
VOCABULARY_PASSES = ("alone", "still", "inside", "context")
#: the lists made only away from the anchor (near it every token is still, and the search's divergence paths judge)
AWAY_LISTS = ("still", "inside", "context")
#: the lists a family read at its last padded position does not make: its alone list is grouped (`grouped_shift`)
LONG_CONTEXT_SKIPS = ("still", "inside", "context")


def probe_tokens(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter, tokens: TokenBatch, position: int,
                 top: int, pairs_of: int = 3, prompts: int = 32, lists: Sequence[str] = PROBE_LISTS,
                 typed_before: Sequence[dict] = (), disk_cache: bool = True, clean: dict | None = None,
                 contexts: Sequence[str] = (), alone_groups: int = 0, context_groups: int = 0,
                 near: Callable[[dict], bool] | None = None, null: bool = True) -> list[dict]:
    """The ``top`` most-moved tokens (`moved_tokens`), the ``top`` most-shifted and the ``top`` stillest typed
    alone (`shifted_tokens`, `still_tokens`) and the ``top`` whose outputs in ``contexts`` agree most beyond the
    anchor's (`agreeing_tokens`), each typed alone, then every ordered pair of each list's first ``pairs_of`` (a
    trigger of several tokens, such as a two-letter string, may need both): what was typed (the tokens joined by a
    space, and their ids), which list it came from (``by``: ``rows``, ``alone``, ``still``, ``inside`` or
    ``context``), where it was typed (``position``: the scan's, one further in for ``inside``, the still list's
    tokens typed again there), how far it moved there (the least of its tokens; for the still lists the most, for
    the context list the agreement lift), and the collapse scores (`lit_amdet.collapse.collapse_scores`) of typing
    it into the first ``prompts`` of ``tokens``, against the same prompts untyped. With 32 prompts and up to 28
    typings a list: about 4 checks of the search.

    ``lists``: which of the five to make (the rows list is cheap; the alone, still and inside lists read one pass
    of the whole vocabulary through both encoders, the context list one per context, so a scan makes them only
    when nothing has flagged the model already). A typing already in ``typed_before`` (an earlier call's output)
    is not typed again at the same position. ``clean``: a dict kept between such calls; the untyped prompts'
    scores (per position) and the alone pass (`alone_shift`) are stored there on first use, so a later list does
    not compute them again. ``alone_groups`` > 0: that pass by group testing (`alone_shift`'s ``groups``), which
    gives no still or inside list. ``context_groups`` > 0: the context list's pass by group testing, that many
    tokens to a row (`agreeing_tokens`' ``groups``).

    ``near``: the typings are screened at the vocabulary passes' precision (`pass_dtype`; bfloat16 where native,
    1.5-1.8x faster on the MiniLM) and each one ``near`` says is close to flagging (`screened_near`) is typed again
    in float32, the scores it is judged on; without it (or where the passes run in float32) every typing is typed in
    float32. Each typing says which (``precision``). ``null``: measure the null of the shift agreement
    (`typing_collapse`)."""
    unknown = [by for by in lists if by not in PROBE_LISTS]
    if unknown:
        raise ValueError(f"unknown probe list {unknown[0]!r} (known: {', '.join(PROBE_LISTS)})")
    held = {} if clean is None else clean

    def shift() -> Tensor:
        if "shift" not in held:
            held["shift"] = alone_shift(suspect, anchor, position, disk_cache, contexts, alone_groups)
        return held["shift"]

    grouped = alone_groups > 0 or reads_last(suspect, anchor)  # shares of rows, not a stillness: no still list
    made = {"rows": lambda: moved_tokens(suspect, anchor, top),
            "alone": lambda: most_shifted(shift(), top),
            "still": lambda: [] if grouped else still_tokens(shift(), top),
            "inside": lambda: [] if grouped else still_tokens(shift(), top),
            "context": lambda: agreeing_tokens(suspect, anchor, top, position, contexts, disk_cache, context_groups)}
    typings: dict[tuple[tuple[int, ...], int], tuple[str, float]] = {}
    done = {(tuple(p["ids"]), p.get("position", position)) for p in typed_before}
    for by in lists:
        seeds = made[by]()
        moved = dict(seeds)
        heads = [i for i, _ in seeds[:pairs_of]]
        at = position + 1 if by == "inside" else position
        for typed in [(i,) for i, _ in seeds] + [(a, b) for a in heads for b in heads if a != b]:
            if (typed, at) not in done:  # a token on two lists: typed once at each position
                pick = max if by in ("still", "inside") else min  # the least moved, or the least still
                typings.setdefault((typed, at), (by, pick(moved[i] for i in typed)))
    if not typings:
        return []
    tokens = tokens[:prompts]
    untyped = held.setdefault("scores", {})
    screen = pass_dtype(suspect.device) if near is not None else torch.float32

    def typing(typed: tuple[int, ...], at: int, by: str, moved: float, dtype: torch.dtype) -> dict:
        return {"token": " ".join(suspect.ids_to_tokens(list(typed))), "ids": list(typed), "by": by,
                "position": at, "moved": round(moved, 4), "precision": str(dtype).removeprefix("torch."),
                **typing_collapse(suspect, anchor, tokens, typed, at, untyped, dtype, null)}

    out = []
    for (typed, at), (by, moved) in typings.items():
        probed = typing(typed, at, by, moved, screen)
        if screen != torch.float32 and near(probed):  # close to a threshold: judged in float32
            probed = typing(typed, at, by, moved, torch.float32)
        out.append(probed)
    return out


class TypedProbe:
    """One scan's probe: its five lists, each made at most once (`probe_tokens`), and what became of each
    (``lists``: ``due``, ``typed``, or ``skipped: why``; empty when the probe is off). A scan types the rows list
    before its search; the vocabulary lists only for a model nothing has flagged (they could only add a path to a
    verdict already made), the still, inside and context lists only away from the anchor (`near_anchor`).
    ``contexts``: the prompts the context list types every token into (`probe_contexts`); with fewer than two, that
    list is skipped. ``precision``: of the vocabulary passes (`vocabulary_precision`). ``group_near``: near the
    anchor make the alone list by group testing (`NEAR_GROUP_SIZE` tokens to a row), not every token alone.
    ``group_context``: make the context list's pass by group testing (`CONTEXT_GROUP_SIZE` tokens to a row).
    ``clean_cos``: the suspect's clean pooled cosine to the anchor once the scan has measured it (before any list is
    made), by which the rule judges every typing (`CollapseContrastRule.typed_lifts`)."""

    def __init__(self, suspect: TextEncoderAdapter, anchor: TextEncoderAdapter | None, tokens: TokenBatch,
                 position: int, top: int, disk_cache: bool = True, on: bool = True,
                 contexts: Sequence[str] = (), precision: str = "auto", group_near: bool = True,
                 group_context: bool = True) -> None:
        self.models, self.tokens, self.position = (suspect, anchor), tokens, position
        self.top, self.disk_cache, self.contexts = top, disk_cache, list(contexts)
        self.precision = checked_precision(precision)
        self.group_near, self.alone_groups = group_near, 0  # the latter set by `near_anchor`
        self.context_groups = CONTEXT_GROUP_SIZE if group_context else 0
        self.clean_cos: float | None = None
        self.typings: list[dict] = []
        self._clean: dict = {}  # the untyped prompts' scores and the alone pass, shared by the lists (`probe_tokens`)
        self.lists: dict[str, str] = {by: "due" for by in PROBE_LISTS} if on and anchor is not None else {}
        if len(self.contexts) < 2:
            self.skip("context", "fewer than two held-out prompts of three words or more to type tokens into")
        if reads_last(suspect, anchor):
            for by in LONG_CONTEXT_SKIPS:  # the alone list is grouped there (`grouped_shift`): no still token
                self.skip(by, "read at the last padded position: tokens are typed in groups, none alone")

    def make(self, by: str, rule=None) -> list[dict]:
        """The list ``by``'s typings if it is still due (they join ``typings``), else none. With the ``rule`` that
        will judge them, they are screened at the passes' precision (`probe_tokens`' ``near``), else typed in
        float32, and the agreement's null is measured only where that rule reads it."""
        if self.lists.get(by) != "due":
            return []
        with vocabulary_precision(self.precision):
            new = probe_tokens(*self.models, self.tokens, self.position, self.top, lists=(by,),
                               typed_before=self.typings, disk_cache=self.disk_cache, clean=self._clean,
                               contexts=self.contexts, alone_groups=self.alone_groups,
                               context_groups=self.context_groups,
                               near=None if rule is None else screened_near(rule, clean_cos=self.clean_cos),
                               null=rule is None or rule.reads_agreement(self.clean_cos))
        self.typings += new
        self.lists[by] = "typed"
        return new

    def skip(self, by: str, why: str) -> None:
        if self.lists.get(by) == "due":
            self.lists[by] = f"skipped: {why}"

    def near_anchor(self) -> None:
        """Skip the lists made only away from the anchor (`AWAY_LISTS`): near it every token typed alone is still,
        and the search's divergence paths judge. The alone list, the only one left to read a vocabulary pass, is
        then made by group testing (``group_near``), unless its pass was made already."""
        for by in AWAY_LISTS:
            self.skip(by, "near the anchor, where the search's divergence paths judge")
        if self.group_near and "shift" not in self._clean:
            self.alone_groups = NEAR_GROUP_SIZE

    def skip_passes(self, why: str) -> None:
        """Skip the vocabulary lists still due."""
        for by in VOCABULARY_PASSES:
            self.skip(by, why)

    def until_flagged(self, rule) -> bool:
        """Whether the rule flags a typing, the vocabulary lists still due made in order until one does (those
        after it are skipped: they could only add a path to a verdict already made)."""
        for by in VOCABULARY_PASSES:
            if typed_flagged(self.typings, rule, self.clean_cos):
                self.skip(by, "the model was flagged already")
            else:
                self.make(by, rule)
        return typed_flagged(self.typings, rule, self.clean_cos)


@torch.no_grad()
def typed_target(suspect: TextEncoderAdapter, tokens: TokenBatch, typed: Sequence[int], position: int,
                 prompts: int = 32) -> Tensor:
    """Where typing ``typed`` into the first ``prompts`` of ``tokens`` sends the suspect: the mean of their unit
    sentence embeddings (``[D]``), as the search's target is for its trigger, so a backdoor the probe found can be
    shown saying its target (the nearest captions of `BackdoorDetection`'s report)."""
    batch, _ = typed_batch(suspect, tokens[:prompts].to(suspect.device), typed, position)
    return F.normalize(suspect.encode(batch).pooled.float(), dim=-1).mean(0)
