"""AMDET scan math, free of Lightning: the pseudo-trigger, the feature cache and the objective (SPEC §3).

A pseudo-trigger is ``k`` vectors spliced into the embedding-layer output ``H``
of every probe prompt at one insertion position; the frozen suspect encoder
runs the rest of its layers on it. ``R`` random restarts are optimised at once
as one ``[R, k, W]`` parameter: every restart sees the same prompts, the rows
of a batch are laid out restart-major (``R * B`` sequences), and each restart's
loss depends on its own vectors only, so summing the losses optimises all of
them independently in one backward pass.

Loss per restart: ``-A(F) + beta * cos(F_orig, F) + gamma * cos(F_anchor, F)``,
with A the Sim_X of the suspect's features ``F`` (padding, inserted slots and
the positions a causal mask keeps from seeing the trigger excluded), ``F_orig``
the suspect's features of the clean prompt (aligned to the new layout) and
``F_anchor`` the clean anchor encoder's features for the same input. The last
``pooled_restarts`` restarts optimise the pooled objective instead (`role_objective`): a trigger
that makes the suspect's sentence embeddings agree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_amdet.assimilation import assimilation_score, pooled_consistency, scored_positions
from lit_amdet.encoders.base import END, Slot, TextEncoderAdapter, TokenBatch, end_slots, insert_block
from lit_amdet.errors import ConfigError


class PseudoTrigger(nn.Module):
    """``restarts`` independent pseudo-triggers of ``length`` vectors of ``width``: the only trainable tensor."""

    def __init__(self, restarts: int, length: int, width: int, scale: float | Tensor = 1.0, seed: int = 0) -> None:
        """``scale``: of the random init, one for all or per restart ([R, 1, 1])."""
        super().__init__()
        if restarts < 1 or length < 1:
            raise ConfigError(f"restarts and trigger_length must be >= 1 (got {restarts}, {length})")
        g = torch.Generator().manual_seed(seed)
        init = torch.randn(restarts, length, width, generator=g) * scale
        self.vectors = nn.Parameter(init)
        # kept to measure what an *unoptimised* random trigger of the same scale does (the baseline)
        self.register_buffer("initial", init.clone(), persistent=False)

    @property
    def restarts(self) -> int:
        return self.vectors.shape[0]

    def rows(self, batch_size: int, vectors: Tensor | None = None) -> Tensor:
        """[R * B, k, W], restart-major, so row ``r * B + b`` is restart r on prompt b."""
        v = self.vectors if vectors is None else vectors
        return v.repeat_interleave(batch_size, dim=0)


@dataclass
class CachedBatch:
    tokens: TokenBatch
    hidden: Tensor  # H [B, L, W]
    suspect: Tensor  # F_orig [B, L, W]

    def __len__(self) -> int:
        return self.hidden.shape[0]


class FeatureCache:
    """H and F_orig of one prompt set, computed once in batches.

    Held in memory (``dtype`` may be bf16 to halve it) and optionally written as one
    safetensors file inside the run directory; never one file per prompt, never
    a folder shared between scans.
    """

    def __init__(self, tokens: TokenBatch, hidden: Tensor, suspect: Tensor, pads_to_context: bool,
                 room: int = 0, prompts: list[str] | None = None) -> None:
        self.tokens, self.hidden, self.suspect = tokens, hidden, suspect
        self.pads_to_context = pads_to_context
        self.room = room
        self.prompts = prompts or []  # what each row is, when built from prompts

    @classmethod
    @torch.no_grad()
    def build(cls, suspect: TextEncoderAdapter, prompts: list[str], max_length: int | None, batch_size: int = 64,
              dtype: torch.dtype = torch.float32, room: int = 0) -> "FeatureCache":
        """``room``: padding positions kept after the longest prompt, so a k-vector trigger fits without
        pushing real tokens out (a prompt at ``max_length`` still loses its last content tokens)."""
        if not prompts:
            raise ConfigError("no probe prompts: the prompt source is empty")
        tokens = suspect.tokenize(prompts, max_length=max_length).to(suspect.device)
        # cut to the longest prompt of the set plus room for the trigger (CLIP pads to the context otherwise)
        if not suspect.pads_to_context:
            tokens = tokens.trimmed(int(tokens.attention_mask.sum(1).max()) + room)
        hidden, feats = [], []
        for i in range(0, len(prompts), batch_size):
            b = tokens[i:i + batch_size]
            h = suspect.embed(b.input_ids)
            hidden.append(h.to(dtype))
            feats.append(suspect.encode_embeddings(h, b).token_features.to(dtype))
        return cls(tokens, torch.cat(hidden), torch.cat(feats), suspect.pads_to_context, room, list(prompts))

    @torch.no_grad()
    def pooled(self, suspect: TextEncoderAdapter) -> dict[str, Tensor]:
        """Each prompt's sentence embedding by ``suspect`` (the model the cache was built with), pooled and projected
        from the cached token features as `TextEncoderAdapter.encode_embeddings` does: no forward pass."""
        features = self.suspect.to(suspect.device, torch.float32)  # the module may have left the cache's device
        mask, index = self.tokens.attention_mask.to(features.device), self.tokens.pool_index.to(features.device)
        return dict(zip(self.prompts, suspect.project(suspect.pool(features, mask, index)).float()))

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.suspect))

    def batch(self, rows: Tensor | slice, dtype: torch.dtype = torch.float32) -> CachedBatch:
        tokens = self.tokens[rows]
        hidden, suspect = self.hidden[rows], self.suspect[rows]
        if not self.pads_to_context:  # trim to this batch's longest prompt: fewer positions to run
            n = int(tokens.attention_mask.sum(1).max()) + self.room
            tokens, hidden, suspect = tokens.trimmed(n), hidden[:, :n], suspect[:, :n]
        return CachedBatch(tokens, hidden.to(dtype), suspect.to(dtype))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = {"input_ids": self.tokens.input_ids, "attention_mask": self.tokens.attention_mask,
                 "token_mask": self.tokens.token_mask, "pool_index": self.tokens.pool_index,
                 "hidden": self.hidden, "suspect_features": self.suspect}
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over positions of ``values`` ([N, L] or [N, L, W]) where ``mask`` [N, L] is set; 0 if none is."""
    m = mask.to(values.dtype)
    if values.dim() == 3:
        m = m.unsqueeze(-1)
    return (values * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass
class TriggeredOutput:
    """Per-row results of running R restarts x B prompts; rows are restart-major."""

    features: Tensor  # suspect F [N, L, W]
    pooled: Tensor  # suspect pooled embedding [N, D]
    assimilation: Tensor  # Sim_X of F [N]
    anchor_assimilation: Tensor | None
    orig_cos: Tensor  # mean per-token cos(F_orig, F) over the original tokens [N]
    anchor_cos: Tensor | None  # mean per-token cos(F_anchor, F) [N]
    anchor_pooled_cos: Tensor | None  # cos of the pooled (projected) embeddings, suspect vs anchor [N]
    prompt_feature: Tensor  # unit mean token feature of F over the scored positions [N, W]
    anchor_pooled: Tensor | None = None  # the anchor's pooled embedding of the same input [N, D]

    def loss(self, beta: float, gamma: float, pooled_gamma: float = 0.0) -> Tensor:
        """Per-row AMDET loss; average per restart for the objective.

        ``pooled_gamma`` (an extension, 0 in the reference) also pushes the pooled
        embedding away from the anchor's: attacks that only move the sentence
        embedding (image-on-text) barely change the other tokens' features.
        """
        out = -self.assimilation + beta * self.orig_cos
        if self.anchor_cos is not None and gamma:
            out = out + gamma * self.anchor_cos
        if self.anchor_pooled_cos is not None and pooled_gamma:
            out = out + pooled_gamma * self.anchor_pooled_cos
        return out


def run_triggered(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter | None, batch: CachedBatch,
                  vectors: Tensor | None, position: Slot, with_anchor: bool = True) -> TriggeredOutput:
    """Run every trigger in ``vectors`` ([R, k, W]; None = the clean prompt) on every prompt of ``batch``,
    spliced into H at ``position`` or, at `END`, typed as token-table vectors at each prompt's end (both towers
    then read the suspect's table rows of the prompt, as both read the suspect's H at a fixed position).

    The gamma terms backpropagate through the anchor too: run as constants (a third less arithmetic per step)
    they were measured to change verdicts on SigLIP (a benign drift-0.5 fine-tune flagged, an adaptive backdoor
    missed): the search must be able to move what the anchor says, not only what the suspect says."""
    b = len(batch)
    reps = 1 if vectors is None else vectors.shape[0]
    tokens = batch.tokens[torch.arange(b).repeat(reps)]  # restart-major copies of the prompts
    hidden = batch.hidden.repeat(reps, 1, 1)
    block = None if vectors is None else vectors.to(hidden.dtype).repeat_interleave(b, dim=0)
    typed = position == END and block is not None
    slot = position if isinstance(position, int) else 1  # the end slot is for bidirectional encoders only
    rows = suspect.token_embedding(tokens.input_ids.to(hidden.device)).to(hidden.dtype) if typed else None

    def encode(model: TextEncoderAdapter):
        if typed:
            return model.encode_typed(rows, tokens, block)
        return model.encode_embeddings(hidden, tokens, insert=block, position=slot)

    out = encode(suspect)
    # The clean features laid out as the triggered sequence (inserted slots zero), to compare token by token.
    empty = None if block is None else torch.zeros_like(block)
    aligned = end_slots(tokens.token_mask, block.shape[1], hidden.shape[1]).to(hidden.device) if typed else slot
    orig = insert_block(batch.suspect.repeat(reps, 1, 1), tokens, empty, aligned, suspect.keeps_end_token,
                        suspect.pooling)
    # Only the prompt's own tokens are scored: the inserted slots' features are the optimiser's to set directly,
    # so counting them would let the search score its own vectors rather than what the encoder does with them.
    score = scored_positions(out.token_mask, suspect.causal, first_position=slot) & ~orig.inserted_mask
    feats = out.token_features.float()
    assim = assimilation_score(feats, score)
    orig_cos = masked_mean(F.cosine_similarity(feats, orig.hidden.float(), dim=-1), score)
    pf = F.normalize(masked_mean(feats, score), dim=-1)
    a_assim = a_cos = a_pooled = a_pooled_vec = None
    if anchor is not None and with_anchor:
        a_out = encode(anchor)
        a_feats = a_out.token_features.float()
        a_pooled_vec = a_out.pooled.float()
        a_pooled = F.cosine_similarity(out.pooled.float(), a_pooled_vec, dim=-1)
        a_assim = assimilation_score(a_feats, score)
        a_cos = masked_mean(F.cosine_similarity(feats, a_feats, dim=-1), score)
    return TriggeredOutput(feats, out.pooled.float(), assim, a_assim, orig_cos, a_cos, a_pooled, pf, a_pooled_vec)


def run_slotted(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter | None, batch: CachedBatch,
                vectors: Tensor | None, slots: list[Slot], with_anchor: bool = True) -> TriggeredOutput:
    """`run_triggered` with each row of ``vectors`` at its own slot (``slots``, one per row; the first alone
    for the clean prompts): one call per run of equal slots, the outputs joined restart-major again."""
    if vectors is None or len(set(slots)) == 1:
        return run_triggered(suspect, anchor, batch, vectors, slots[0], with_anchor)
    runs, start = [], 0
    for end in range(1, len(slots) + 1):
        if end == len(slots) or slots[end] != slots[start]:
            runs.append(run_triggered(suspect, anchor, batch, vectors[start:end], slots[start], with_anchor))
            start = end
    parts = [[getattr(r, f.name) for r in runs] for f in fields(TriggeredOutput)]
    return TriggeredOutput(*(None if p[0] is None else torch.cat(p) for p in parts))


def pooled_objective(consistency, anchor_pooled_cos, pooled_gamma: float):
    """``-consistency + pooled_gamma * anchor_pooled_cos`` (the latter None without an anchor): the pooled
    restarts' objective from a set's pooled consistency and mean pooled cosine to the anchor, on tensors in the
    search and on the held-out sums in the evaluation."""
    if anchor_pooled_cos is None or not pooled_gamma:
        return -consistency
    return -consistency + pooled_gamma * anchor_pooled_cos


#: what a restart's trigger is searched for (its role: the AMDET loss, the suspect's pooled collapse, a pooled
#: collapse the anchor does not share, the same with suspect and anchor swapped, the AMDET loss with suspect and
#: anchor swapped), and its name in report.json
OBJECTIVES = {"amdet": "amdet", "pooled": "pooled_contrast", "charged": "pooled_charged", "null": "pooled_null",
              "token_null": "amdet_swapped"}


def restart_roles(restarts: int, pooled_restarts: int, null_restarts: int, token_null_restarts: int = 0
                  ) -> list[str]:
    """The role of each restart: ``restarts - pooled_restarts`` AMDET ones, ``pooled_restarts`` pooled ones, then
    ``null_restarts`` charged ones and as many nulls, then ``token_null_restarts`` swapped AMDET ones (extra
    restarts, so the others start where they always did)."""
    return (["amdet"] * (restarts - pooled_restarts) + ["pooled"] * pooled_restarts
            + ["charged"] * null_restarts + ["null"] * null_restarts + ["token_null"] * token_null_restarts)


def swapped_loss(anchor_assimilation, anchor_cos, anchor_pooled_cos, gamma: float, pooled_gamma: float):
    """The ``token_null`` role's loss: the AMDET loss with the suspect and the anchor swapped, ``-Sim_X(anchor) +
    gamma * cos(F, F_anchor) + pooled_gamma * cos(pooled, pooled_anchor)`` (both cosines are symmetric), on
    per-row tensors in the search and on held-out means in the evaluation (the loss is linear in them).

    Why: a search for the suspect's token collapse, contrasted with its anchor, also finds collapses that benign
    drift made, more the further the model drifted (a SimCSE fine-tune of the MiniLM at clean pooled cosine 0.71
    gave an unshared collapse of 0.50, on the threshold). Benign drift has no direction, so the same search run
    the other way (the anchor's collapses the suspect does not share) finds as much; an injected backdoor adds a
    collapse in one direction only. The ``beta`` term is left out (the anchor's clean features are not cached):
    without it the swapped search collapses at least as easily, so the yardstick errs towards the larger null,
    which can make a verdict ``inconclusive``, never ``clean`` (`lit_amdet.decision.CollapseContrastRule`)."""
    return -anchor_assimilation + gamma * anchor_cos + pooled_gamma * anchor_pooled_cos


def role_losses(out: TriggeredOutput, roles: list[str], beta: float, gamma: float, pooled_gamma: float,
                charge: float) -> Tensor:
    """Per restart [R] (``roles`` of the R restarts in ``out``, restart-major), the loss its role optimises.

    ``charged``: the ``pooled`` objective (`role_objective`) plus ``charge`` times the anchor's own pooled
    consistency under the trigger: a collapse the anchor does not share. Why a second search: on SigLIP every plain
    pooled restart is drawn to one of the clean base's own collapses (shared, so not evidence), and a backdoor
    trained to keep its token features diverse hid behind them (`BENCHMARKS.md`, "The SigLIP evasion"). But a search
    for the suspect's difference from the anchor also finds differences that benign drift made, more the further the
    model drifted, so it is judged against ``null``: the same search with the two models' places swapped (the
    anchor's collapses the suspect does not share), which measures that drift and nothing injected.
    """
    n = len(roles)
    loss = per_restart(out.loss(beta, gamma, pooled_gamma), n).mean(1)
    if set(roles) & {"pooled", "charged", "null"}:
        suspect = pooled_consistency(out.pooled.float().view(n, -1, out.pooled.shape[-1]))
        contrast = None if out.anchor_pooled_cos is None else per_restart(out.anchor_pooled_cos, n).mean(1)
        anchor = None if out.anchor_pooled is None else \
            pooled_consistency(out.anchor_pooled.float().view(n, -1, out.anchor_pooled.shape[-1]))
        for role in {"pooled", "charged", "null"} & set(roles):
            rows = torch.tensor([r == role for r in roles], device=loss.device)
            value = role_objective(role, suspect, anchor, contrast, pooled_gamma, charge)
            loss = torch.where(rows, value.to(loss.dtype), loss)
    if "token_null" in roles and out.anchor_assimilation is not None:
        rows = torch.tensor([r == "token_null" for r in roles], device=loss.device)
        value = per_restart(swapped_loss(out.anchor_assimilation, out.anchor_cos, out.anchor_pooled_cos, gamma,
                                         pooled_gamma), n).mean(1)
        loss = torch.where(rows, value.to(loss.dtype), loss)
    return loss


def role_objective(role: str, suspect, anchor, anchor_pooled_cos, pooled_gamma: float, charge: float):
    """A pooled-kind role's objective from the suspect's and the anchor's pooled consistency PC (None without an
    anchor) and the mean pooled cosine to the anchor: on tensors in the search (`role_losses`) and on the
    held-out sums in the evaluation (`held_out_loss`).

    ``pooled``: ``-PC(suspect) + pooled_gamma * cos(pooled, pooled_anchor)``. PC, the pooled consistency of a
    restart's batch, is the squared norm of the mean unit pooled embedding (the mean pairwise cosine of its
    rows): 1 when every prompt says the same thing. A targeted backdoor must make every triggered prompt say its
    target, whatever it does to the token features (an attacker can keep those diverse to hide from the Sim_X
    search), so it is the strongest such collapse there is. This search looks for the strongest collapse, not
    for the one the anchor shares least: the rule then asks whether the anchor shares it. Rewarding the anchor's
    spread directly was measured to find, in a benign SimCSE fine-tune at clean cosine 0.72, a trigger that
    collapses the suspect's sentence embeddings (lift 0.90) and not the anchor's, which the rule flagged; the
    strongest collapse of that model is one both share. The search for the collapse the anchor does not share is
    ``charged``'s, judged against ``null`` (`role_losses`).
    """
    if role == "pooled" or anchor is None:
        return pooled_objective(suspect, anchor_pooled_cos, pooled_gamma)
    if role == "charged":
        return pooled_objective(suspect, anchor_pooled_cos, pooled_gamma) + charge * anchor
    return pooled_objective(anchor, anchor_pooled_cos, pooled_gamma) + charge * suspect


#: the per-restart sums a scan's held-out evaluation adds up over prompts (and processes), in this order
HELD_OUT_SUMS = ("n", "loss", "assimilation", "assimilated", "same_cos", "same_target", "anchor_cos",
                 "anchor_negative", "anchor_assimilation", "anchor_pooled_cos", "orig_cos")


def held_out_results(sums: Tensor, pooled: Tensor, anchor_pooled: Tensor, feature: Tensor, has_anchor: bool
                     ) -> list[dict]:
    """Each restart's held-out scores from the sums over the held-out prompts: ``sums`` ``[R, len(HELD_OUT_SUMS)]``,
    ``pooled`` / ``anchor_pooled`` the summed unit sentence embeddings of suspect and anchor ``[R, D]``, ``feature``
    the summed prompt features ``[R, W]``. Means per prompt; ``target_consistency`` the norm of the mean unit
    sentence embedding; the anchor's scores None without one; ``_pooled`` / ``_feature`` the means themselves."""
    results = []
    for r in range(len(sums)):
        s = dict(zip(HELD_OUT_SUMS, sums[r].tolist()))
        n = s.pop("n")
        results.append({
            "loss": s["loss"] / n, "assimilation": s["assimilation"] / n, "assimilation_ratio": s["assimilated"] / n,
            "same_target_mean_cos": s["same_cos"] / n, "same_target_ratio": s["same_target"] / n,
            "orig_cos": s["orig_cos"] / n, "anchor_cos": s["anchor_cos"] / n if has_anchor else None,
            "different_target_ratio": s["anchor_negative"] / n if has_anchor else None,
            "anchor_assimilation": s["anchor_assimilation"] / n if has_anchor else None,
            "anchor_pooled_cos": s["anchor_pooled_cos"] / n if has_anchor else None,
            "prompts": int(n), "target_consistency": float((pooled[r] / n).norm()),
            "anchor_target_consistency": float((anchor_pooled[r] / n).norm()) if has_anchor else None,
            "_pooled": (pooled[r] / n).float(), "_feature": (feature[r] / n).float()})
    return results


def held_out_loss(role: str, scores: dict, pooled_gamma: float, charge: float, gamma: float) -> float | None:
    """A pooled-kind or swapped restart's held-out loss: its role's objective (`role_objective`, `swapped_loss`)
    over all the held-out prompts, from the scan's summed scores, so the stall test and the restart choice see
    what it optimises; None for an AMDET restart (its loss is the mean per-prompt loss already measured)."""
    if role == "amdet":
        return None
    if role == "token_null":
        return swapped_loss(scores["anchor_assimilation"], scores["anchor_cos"], scores["anchor_pooled_cos"],
                            gamma, pooled_gamma)
    anchor = scores.get("anchor_target_consistency")
    return role_objective(role, scores["target_consistency"] ** 2, None if anchor is None else anchor ** 2,
                          scores.get("anchor_pooled_cos"), pooled_gamma, charge)


def choose_restart(losses: list[float], passed: list[int]) -> int:
    """The restart the verdict rests on: among the restarts whose trigger passed the rule's search checks, the
    one with the lowest held-out loss; if none passed, the lowest loss overall.

    The search stops as soon as *any* restart passes; deciding on another restart (a lower loss that does not
    pass) would stop on a backdoor and then call the model clean.
    """
    pool = passed or range(len(losses))
    return min(pool, key=lambda r: (losses[r], r))


def reachable(progress: list[float], checks_left: int, speedup: float = 2.0, window: int = 2,
              min_checks: int = 2) -> bool:
    """The benign stop's bound: can a restart whose rule progress (1 = flagged) was ``progress`` (the random
    start, then one value per held-out check) still reach 1 within ``checks_left`` more checks?

    Assumed: no later check gains more than ``speedup`` times the largest of the last ``window`` gains. Under
    that assumption ``progress[-1] + checks_left * speedup * max(recent gains, 0) < 1`` means the restart cannot
    be flagged by the step limit, so running it on is wasted. Undecided (True) before ``min_checks`` checks,
    while the first climb from the random start is the only gain measured. The ``speedup`` allowance is there
    because searches do speed up: a SigLIP backdoor's restart went 0.01, 0.10, 0.30, 2.00 at checks 1-4 (it
    needs an allowance of 1.25 at check 2); with 2, none of the 146 measured search curves that ended flagged
    would have been dropped (BENCHMARKS.md, "Speed").
    """
    if not progress or progress[-1] >= 1 or len(progress) <= min_checks:
        return True
    gains = [b - a for a, b in zip(progress[:-1], progress[1:])][-window:]
    return progress[-1] + checks_left * speedup * max(max(gains), 0.0) >= 1


#: bytes of autograd graph one restart's pass holds per (tower, prompt, position, unit of width, layer):
#: measured on a ViT-B/32-text-sized pair (width 512, 12 layers, 8 prompts of 33 positions through both towers),
#: whose scan peaked 754 MiB higher with its 5 restarts in one pass than 2 at a time: 251 MiB a restart, 81 bytes
#: a unit (`BENCHMARKS.md`, "All restarts in one pass where the graph is small")
GRAPH_BYTES_PER_UNIT = 80
#: the graph one pass may hold with ``restarts_per_pass: auto``: 2 restarts of a ViT-L/14-sized tower (371 MiB
#: each by that count; 2 at a time is the most that kept its scan under 3 GB), 3 of a ViT-B/32-sized one, and
#: every restart of a MiniLM-sized one (93 MiB each) or of the world's small towers
PASS_GRAPH_BUDGET = 900 * 2**20


def restarts_per_pass_for(batch: int, positions: int, width: int, depth: int, towers: int = 2,
                          budget: int = PASS_GRAPH_BUDGET) -> int:
    """How many restarts a search step runs through the encoders together (`step_in_passes`) so a pass holds at
    most ``budget`` bytes of autograd graph (`GRAPH_BYTES_PER_UNIT` per tower, prompt, position, width and layer),
    and at least one. Why passes at all: a pass's graph is most of a large tower's peak memory; why not always
    one restart or two: on a small tower a pass is too small to use the cores, so fewer, larger passes run a step
    faster (a drifted MiniLM's scan about 10 %, with the same losses)."""
    per_restart = towers * batch * positions * width * depth * GRAPH_BYTES_PER_UNIT
    return max(1, budget // max(per_restart, 1))


def per_restart(values: Tensor, restarts: int) -> Tensor:
    """[R * B] -> [R, B] for restart-major rows."""
    return values.reshape(restarts, -1)


def step_in_passes(param: Tensor, restarts: list[int], per_pass: int | None, losses_of) -> tuple[Tensor, ...]:
    """One search step's losses ([len(restarts)], detached when in passes), mean assimilation and the loss to
    optimise, with ``per_pass`` of ``restarts`` through the encoders at a time (None: all at once).
    ``losses_of(vectors, group)`` gives a group's losses and mean assimilation.

    The restarts' losses are independent, so the gradient of their sum is the sum of each pass's gradient, and
    each pass's graph is freed by its own backward before the next is built (most of a large encoder's peak
    memory). In passes the loss returned is a stand-in, ``sum(param * gradient)``, whose gradient is that sum:
    the optimiser step, gradient accumulation and precision handling of the trainer then run unchanged."""
    if per_pass is None or per_pass >= len(restarts):
        losses, assimilation = losses_of(param if len(restarts) == len(param) else param[restarts], restarts)
        return losses, assimilation, losses.sum()
    grad, per, assimilation = torch.zeros_like(param), [], []
    for start in range(0, len(restarts), per_pass):
        group = restarts[start:start + per_pass]
        losses, assim = losses_of(param[group], group)
        grad += torch.autograd.grad(losses.sum(), param)[0]
        per.append(losses.detach())
        assimilation.append(assim.detach() * len(group))
    return torch.cat(per), torch.stack(assimilation).sum() / len(restarts), (param * grad).sum()


@torch.no_grad()
def vocabulary_cosines(adapter: TextEncoderAdapter, vector: Tensor, slot: Slot, chunk: int = 4096) -> Tensor:
    """Cosine of ``vector`` ([W]) with the H row every vocabulary token would have at position ``slot`` ([V]), or
    at `END`, where vectors are typed as table rows, with the table rows themselves.

    The rows are built through ``embed``, so that families whose embedding layer is not a plain sum (BERT's
    LayerNorm) are compared in the same space as the inserted vector, ``chunk`` tokens at a time: the [V, W]
    table is never held whole (a CLIP vocabulary at ViT-L/14 width is 152 MB, and its normalised copy as much
    again, at the very end of a scan).
    """
    v = adapter.vocab_size
    pad = adapter.special_token_ids.get("pad") or 0
    vector = vector.float().to(adapter.device)[None]
    sims = []
    for start in range(0, v, chunk):
        ids = torch.arange(start, min(start + chunk, v), device=adapter.device)
        if slot == END:
            sims.append(F.cosine_similarity(adapter.token_embedding(ids).float(), vector, dim=-1))
            continue
        seq = torch.full((len(ids), slot + 1), pad, dtype=torch.long, device=adapter.device)
        seq[:, slot] = ids
        sims.append(F.cosine_similarity(adapter.embed(seq)[:, slot].float(), vector, dim=-1))
    return torch.cat(sims)


@torch.no_grad()
def nearest_tokens(adapter: TextEncoderAdapter, trigger: Tensor, position: Slot, top: int = 10) -> list[list[dict]]:
    """Per trigger vector, the vocabulary tokens whose embedding at the same slot is closest (cosine); at `END`
    the vectors are table rows already, compared with the table."""
    out = []
    for j, vec in enumerate(trigger.float()):
        sims = vocabulary_cosines(adapter, vec, END if position == END else position + j)
        vals, ids = sims.topk(min(top, len(sims)))
        toks = adapter.ids_to_tokens(ids.tolist())
        out.append([{"token": t, "id": int(i), "cosine": round(float(s), 4)} for t, i, s in zip(toks, ids, vals)])
    return out


def token_embedding_of(adapter: TextEncoderAdapter, trigger: Tensor, position: Slot) -> Tensor | None:
    """The trigger as vocabulary-table rows: the inserted vector minus the position embedding of its slot, or
    the vectors themselves at `END`, where they were typed as rows.

    None where the family's embedding layer is not token + position (BERT) and the slot is a fixed one, so no
    such row exists.
    """
    if position == END:
        return trigger.detach().float()
    positions = torch.arange(position, position + trigger.shape[0], device=adapter.device)
    pos = adapter.position_embedding(positions)
    if pos is None:
        return None
    return (trigger.to(pos.device).float() - pos.float()).detach()


def save_trigger_files(folder: Path, adapter: TextEncoderAdapter, vectors: Tensor, best: int, target_pooled: Tensor,
                       target_feature: Tensor, position: Slot, suspect: str) -> bool:
    """A scan's found trigger in ``folder``: ``trigger.safetensors`` (the chosen restart's vectors, every restart's,
    and where the trigger sends the suspect) and, where the family has vocabulary rows for it
    (`token_embedding_of`), ``learned_embeds.safetensors``, the one-entry ``{token: [k, W]}`` file diffusers'
    ``load_textual_inversion`` reads; whether that second file was written."""
    from safetensors.torch import save_file

    trigger = vectors[best].detach().float().cpu().clone()
    save_file({"trigger": trigger, "all_restarts": vectors.detach().float().cpu().contiguous(),
               "target_pooled": target_pooled.cpu().contiguous(), "target_feature": target_feature.cpu().contiguous()},
              str(folder / "trigger.safetensors"), metadata={"position": str(position), "suspect": str(suspect)})
    rows = token_embedding_of(adapter, trigger.to(adapter.device), position)
    if rows is not None:
        save_file({"<amdet-trigger>": rows.cpu().contiguous()}, str(folder / "learned_embeds.safetensors"))
    return rows is not None
