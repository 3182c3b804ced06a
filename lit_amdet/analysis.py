"""The numbers behind the analysis figures (paper Figs. 2-4): Sim_X of clean vs triggered prompts, and
how much attention the prompt's tokens put on the first (BOS) token vs on the trigger.

The paper's observation: in a benign CLIP the last layer's attention concentrates
on ``<BOS>``; in a backdoored one, when the trigger is present, it concentrates on
the trigger token, and the final token features of the whole prompt become alike
(Sim_X jumps). Plain functions over `TextEncoderAdapter`, no Lightning, no
plotting; ``benchmarks/figures.py`` draws them:

    python benchmarks/figures.py --backdoored runs/benchmark_quick/zoo/minilm-test-backdoored-000 \\
        --benign runs/benchmark_quick/zoo/minilm-test-benign-000 --out benchmarks/figures --tensorboard runs/figures/tb
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lit_amdet.assimilation import assimilation_score, scored_positions
from lit_amdet.encoders.base import TextEncoderAdapter, TokenBatch

#: the "BOS" position: CLIP's <|startoftext|>, BERT's [CLS]; SigLIP has no BOS, so there it is the first word
BOS_POSITION = 0


def tokenize_compact(adapter: TextEncoderAdapter, prompts: Sequence[str]) -> TokenBatch:
    """Tokenise, cut to the longest real prompt (exact where padding is masked; SigLIP keeps its full padding)."""
    batch = adapter.tokenize(list(prompts))
    if not adapter.pads_to_context:
        batch = batch.trimmed(int(batch.token_mask.sum(1).max()))
    return batch


def trigger_token_ids(adapter: TextEncoderAdapter, trigger_text: str) -> list[int]:
    """The trigger text's token ids on its own, without special tokens."""
    return list(adapter.tokenizer(trigger_text, add_special_tokens=False)["input_ids"])


def trigger_token_positions(poisoned_ids: Sequence[int], trigger_ids: Sequence[int],
                            clean_ids: Sequence[int] | None = None) -> list[int]:
    """Positions (into ``poisoned_ids``) of the trigger's tokens.

    Every contiguous occurrence of ``trigger_ids`` counts. When there is none (the
    trigger was merged into a word, as ``replace_char`` does: "photo" -> "phzzzzto"),
    the tokens of the poisoned prompt that the clean prompt lacks are the trigger's
    (a diff of the two id sequences), if ``clean_ids`` is given. Empty when neither works.
    """
    poisoned, trigger = list(poisoned_ids), list(trigger_ids)
    k = len(trigger)
    found: list[int] = []
    if k:
        for start in range(len(poisoned) - k + 1):
            if poisoned[start:start + k] == trigger:
                found.extend(range(start, start + k))
    if found or clean_ids is None:
        return sorted(set(found))
    matcher = difflib.SequenceMatcher(a=list(clean_ids), b=poisoned, autojunk=False)
    return [j for tag, _, _, j1, j2 in matcher.get_opcodes() if tag in ("insert", "replace") for j in range(j1, j2)]


def trigger_mask(adapter: TextEncoderAdapter, clean: TokenBatch, poisoned: TokenBatch, trigger_text: str) -> Tensor:
    """[B, L] True at the trigger's tokens of each poisoned prompt (row ``i`` of ``clean`` is its clean version).

    A prompt that fills the whole context may have lost its trigger to truncation,
    and then a diff would only find shifted words: such rows use the id match alone.
    """
    ids = trigger_token_ids(adapter, trigger_text)
    mask = torch.zeros(poisoned.input_ids.shape, dtype=torch.bool)
    for row in range(len(poisoned)):
        real = poisoned.token_mask[row].bool().cpu()
        places = real.nonzero().flatten()  # real tokens' positions (padding is not always only on the right)
        poisoned_ids = poisoned.input_ids[row].cpu()[real].tolist()
        clean_ids = clean.input_ids[row].cpu()[clean.token_mask[row].bool().cpu()].tolist()
        truncated = len(poisoned_ids) >= adapter.context_length
        for j in trigger_token_positions(poisoned_ids, ids, None if truncated else clean_ids):
            mask[row, places[j]] = True
    return mask


def attention_mass(attention: Tensor, token_mask: Tensor, trigger: Tensor, causal: bool,
                   bos_position: int = BOS_POSITION) -> tuple[Tensor, Tensor]:
    """Mean attention the other tokens put on the BOS token and on the trigger tokens (together), per prompt.

    ``attention``: one layer's probabilities, heads already averaged, [B, L, L]
    (query, key). The queries averaged over are the real tokens other than BOS and
    the trigger, and under a causal mask only those at or after the trigger's first
    token (the earlier ones cannot see it, so they would say nothing about it).
    Returns (bos [B], trigger [B]); NaN for a prompt without a trigger or without
    such a query.
    """
    bsz, length = token_mask.shape
    trigger = trigger.bool().to(attention.device)
    queries = token_mask.bool().to(attention.device) & ~trigger
    queries[:, bos_position] = False
    if causal:
        positions = torch.arange(length, device=attention.device)
        none = torch.full((bsz,), length, device=attention.device)
        first = torch.where(trigger.any(1), trigger.int().argmax(1), none)
        queries &= positions.unsqueeze(0) >= first.unsqueeze(1)
    weights = queries.to(attention.dtype)
    count = weights.sum(1)
    on_bos = (attention[:, :, bos_position] * weights).sum(1)
    on_trigger = ((attention * trigger.unsqueeze(1).to(attention.dtype)).sum(-1) * weights).sum(1)
    usable = (count > 0) & trigger.any(1)
    nan = torch.full_like(count, float("nan"))
    return (torch.where(usable, on_bos / count.clamp(min=1), nan),
            torch.where(usable, on_trigger / count.clamp(min=1), nan))


def sim_x(adapter: TextEncoderAdapter, batch: TokenBatch) -> Tensor:
    """Sim_X per prompt, counted over the positions the repo's training metrics count."""
    out = adapter.encode(batch)
    return assimilation_score(out.token_features.float(), scored_positions(out.token_mask, adapter.causal)).cpu()


def last_layer_attention(adapter: TextEncoderAdapter, batch: TokenBatch) -> Tensor:
    """The last layer's attention averaged over heads: [B, L, L]."""
    return adapter.attention_maps(batch)[:, -1].float().mean(1).cpu()


@dataclass
class PromptAnalysis:
    """Per-prompt numbers of one model on clean prompts and their triggered versions (row i <-> row i)."""

    sim_x_clean: Tensor  # [N]
    sim_x_triggered: Tensor  # [N]
    bos_mass: Tensor  # [N]; NaN where no trigger token was found
    trigger_mass: Tensor  # [N]
    trigger_found: Tensor  # [N] bool


@torch.no_grad()
def analyse_prompts(adapter: TextEncoderAdapter, clean_prompts: Sequence[str], triggered_prompts: Sequence[str],
                    trigger_text: str, batch_size: int = 64) -> PromptAnalysis:
    """Sim_X of both prompt sets and the last layer's BOS / trigger attention mass of the triggered ones."""
    if len(clean_prompts) != len(triggered_prompts):
        raise ValueError("clean and triggered prompts must pair up row by row")
    parts: dict[str, list[Tensor]] = {k: [] for k in ("clean", "triggered", "bos", "trigger", "found")}
    for start in range(0, len(clean_prompts), batch_size):
        clean = tokenize_compact(adapter, clean_prompts[start:start + batch_size])
        poisoned = tokenize_compact(adapter, triggered_prompts[start:start + batch_size])
        where = trigger_mask(adapter, clean, poisoned, trigger_text)
        bos, trig = attention_mass(last_layer_attention(adapter, poisoned), poisoned.token_mask, where, adapter.causal)
        parts["clean"].append(sim_x(adapter, clean))
        parts["triggered"].append(sim_x(adapter, poisoned))
        parts["bos"].append(bos)
        parts["trigger"].append(trig)
        parts["found"].append(where.any(1))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return PromptAnalysis(cat["clean"], cat["triggered"], cat["bos"], cat["trigger"], cat["found"])


@dataclass
class AttentionExample:
    """One prompt's last-layer, head-averaged attention over its real tokens."""

    prompt: str
    tokens: list[str]
    attention: Tensor  # [n, n] (query, key)
    trigger_positions: list[int]
    bos_mass: float  # `attention_mass` of this prompt
    trigger_mass: float


@torch.no_grad()
def attention_example(adapter: TextEncoderAdapter, clean_prompt: str, triggered_prompt: str,
                      trigger_text: str) -> AttentionExample:
    clean = tokenize_compact(adapter, [clean_prompt])
    poisoned = tokenize_compact(adapter, [triggered_prompt])
    real = poisoned.token_mask[0].bool()
    where = trigger_mask(adapter, clean, poisoned, trigger_text)
    attention = last_layer_attention(adapter, poisoned)
    bos, trig = attention_mass(attention, poisoned.token_mask, where, adapter.causal)
    tokens = adapter.ids_to_tokens(poisoned.input_ids[0][real].tolist())
    return AttentionExample(triggered_prompt, tokens, attention[0][real][:, real],
                            where[0][real].nonzero().flatten().tolist(), float(bos[0]), float(trig[0]))
