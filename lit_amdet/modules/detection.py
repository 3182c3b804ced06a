"""`BackdoorDetection`: the AMDET scan as a LightningModule (``lit-amdet detect``, SPEC §3).

The only trainable parameter is the pseudo-trigger (`PseudoTrigger`, R restarts
at once). Lightning drives the search: the probe prompts are the training set
(sharded under DDP, the trigger's gradient all-reduced by DDP), the held-out
checks run every ``check_every`` steps on each process's share of the held-out
prompts and are summed across processes, so every process takes the same
early-stop decision. After the search: the final triggers' held-out scores pick the
best restart (``on_train_end``), the evidence callbacks (`LossLandscape`,
`HessianSpectrum`) measure it (``on_fit_end``), and then the decision rule gives
the verdict and process 0 writes the run folder in one atomic rename.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from lit_amdet.amdet import (
    HELD_OUT_SUMS,
    OBJECTIVES,
    FeatureCache,
    PseudoTrigger,
    choose_restart,
    held_out_loss,
    held_out_results,
    nearest_tokens,
    per_restart,
    restart_roles,
    restarts_per_pass_for,
    role_losses,
    run_slotted,
    run_triggered,
    save_trigger_files,
    step_in_passes,
)
from lit_amdet.captions import caption_bank, nearest_captions
from lit_amdet.collapse import DRIFT_FLOOR, with_baselines
from lit_amdet.decision import INCONCLUSIVE, CollapseContrastRule, DecisionRule, verdict_of
from lit_amdet.encoders import END, TextEncoderAdapter, check_same_architecture, file_sha256, load_encoder
from lit_amdet.errors import ConfigError
from lit_amdet.io import StagedFolder, write_json
from lit_amdet.memory import release_free_memory
from lit_amdet.modules.base import EncoderTask
from lit_amdet.restart_scores import (
    YARDSTICKS,
    attach_null,
    decide_finite,
    finite_baselines,
    judge_restarts,
    restart_summary,
)
from lit_amdet.scan_options import check_scan_options
from lit_amdet.screening import anchor_component, load_anchor, scan_targets
from lit_amdet.search_control import SearchControl
from lit_amdet.token_probe import Precision, TypedProbe, probe_contexts, typed_target
from lit_amdet.typed_verdict import deciding_typing, verdict_scores

RELEASE_EVERY = 10  #: steps between giving freed pages back (`lit_amdet.memory`): 10 steps' creep is small


class BackdoorDetection(EncoderTask):
    """Scan ``suspect`` for an injected textual backdoor.

    Args:
        suspect: the encoder under test: a checkpoint folder, a diffusers pipeline folder, a single-file Stable
            Diffusion checkpoint, a hub id, a weights file with ``model_name``, or ``minilm``. Several (a list, or a
            folder of checkpoints), or a container with several text encoders (SDXL), are each scanned by
            ``lit-amdet detect`` (`lit_amdet.screening`), with the anchor loaded once.
        anchor: a clean reference encoder of the same architecture (normally the public base the
            suspect claims to be fine-tuned from); None turns the gamma term and the contrast checks off.
        model_name: open_clip architecture name when ``suspect``/``anchor`` are bare weights files.
        name: the model's name in the verdict line (default: the suspect's folder, file or hub name).
        component: which text encoder of a pipeline or single file (``text_encoder_2``); default: each of them.
        trigger_length: k, the number of inserted pseudo-token vectors.
        position: insertion slot (1 = right after BOS/CLS); a setting of its own, not tied to k.
        end_restarts: extra AMDET restarts whose vectors are typed at each prompt's end instead (token-table
            vectors with the position of where they land, `TextEncoderAdapter.encode_typed`), with a swapped one
            at the end as their yardstick; for a trigger that fires only at the end. Bidirectional encoders only.
        restarts: R independent random initialisations optimised together; the best held-out loss (of each
            restart's own objective) wins when none is flagged.
        pooled_restarts: how many of the R restarts optimise the pooled collapse (`lit_amdet.amdet.role_objective`: the
            suspect's sentence embeddings agree) instead of the AMDET loss; they find backdoors trained to keep
            the token features diverse, which the Sim_X search misses. None: half of them (rounded down).
        beta, gamma: weights of cos(F_orig, F) and cos(F_anchor, F) in the loss.
        pooled_gamma: weight of cos(pooled, pooled_anchor) in the loss (an extension for attacks that move
            only the sentence embedding, such as image-on-text; 0 = the reference loss; off without an anchor).
        null_restarts: extra restarts, this many searching for a pooled collapse the anchor does not share
            ("charged") and as many for the same with the two models swapped ("null"), which the charged ones are
            judged against (`lit_amdet.amdet.role_losses`, `CollapseContrastRule`); 0 = none. Off without an anchor.
        null_charge: weight of the other model's pooled consistency in the charged and null restarts' objective.
        null_min_steps: the benign stop never drops a charged or null restart before this step (the charged
            search was measured to climb late: 0.01, 0.03, 0.02, 0.07, 0.84, 2.0 at checks 1-6).
        token_null_restarts: extra restarts: the AMDET search with the models swapped (`lit_amdet.amdet.swapped_loss`),
            the token path's yardstick away from the anchor (`CollapseContrastRule`); dropped at once near it.
        typed_probe: type the N most-moved rows', N most-shifted-alone, N stillest-alone (also one position
            further in) and N most-agreeing-in-context tokens (`lit_amdet.token_probe`; 0 off; off for a rule with no
            `typing_judge`). The rows list is typed before the search; the others, read off passes of the whole
            vocabulary through both encoders, at the first check, only while nothing has flagged the model (else they
            could only add to a verdict already made); the still, inside and context lists only away from the anchor.
        anchor_cache: keep the anchor's half of the vocabulary passes on disk for the next scan against the anchor
            (`lit_amdet.anchor_cache`: keyed by a digest of the anchor's weights; ``$LIT_AMDET_CACHE``).
        vocabulary_precision: of those passes and of the typings' screen (`lit_amdet.token_probe.pass_dtype`;
            ``auto``: bfloat16 where the device has it natively); a typing near a threshold is judged in float32.
        alone_in_groups, context_in_groups: make by group testing the alone list near the anchor (the only list read
            there; `NEAR_GROUP_SIZE` tokens to a row: 2.3x cheaper on the MiniLM) and the context list's pass away
            from it (8 to a row, the rows that agree most opened, `lit_amdet.vocabulary_pass.agreeing_rows`: 5x).
        lr, weight_decay: Adam on the trigger (reference 0.08, 1e-5).
        batch_size: probe prompts per step (each runs R times).
        restarts_per_pass: restarts through the encoders together (None: all; ``auto``: as many as
            `lit_amdet.amdet.restarts_per_pass_for` fits in a pass of this tower); fewer hold less autograd graph
            at once, for the same step (`lit_amdet.amdet.step_in_passes`).
        probe_prompts, holdout_prompts: prompts taken from the DataModule's train and val splits.
        max_length: token positions per prompt (families that pad to their context ignore it).
        check_every: steps between held-out checks (early stop: a passing trigger, a stalled loss, the benign stop).
        benign_stop: drop a restart once the rule's progress towards flagging it (`DecisionRule.progress`)
            cannot reach the thresholds in the steps left under the bound of `lit_amdet.amdet.reachable` (its
            recent gain per check, carried to the step limit); the search ends when every restart is dropped
            (`SearchControl`). Dropped restarts keep their trigger and still count in the verdict. A benign
            model, the common case, stops after a few checks instead of running to the step limit.
        benign_stop_speedup: the bound's allowance: how much faster than its recent best gain a search may climb.
        patience, stall_tol: stop after ``patience`` checks in which no restart's held-out loss improved ``stall_tol``.
        rule: the decision rule (default `CollapseContrastRule`, `ContrastRule` the old one, `ReferenceRule` AMDET's)
        evidence_prompts: held-out prompts the landscape and Hessian are computed on.
        evidence_callbacks: add `LossLandscape` and `HessianSpectrum` with their defaults when the trainer
            has none of its own (off by default: the default rule does not read them, and they cost more than a
            benign scan's whole search; on anyway for a rule that reads them, `ReferenceRule`'s landscape filter;
            a config that lists them gets them either way).
        caption_bank: a text file of candidate captions for "what the backdoor makes the model say"
            (default: the probe and held-out prompts).
        top_captions, top_tokens: how many nearest captions / vocabulary tokens to report.
        output_dir: the run folder (default: ``<trainer.default_root_dir>/detect/<name>``); replaced atomically.
        cache_dtype: float32 or bfloat16 for the in-memory feature cache.
        save_cache: also write the feature cache as one safetensors file in the run folder.
        seed: trigger initialisation and landscape direction.
        allow_pickle: allow legacy pickle checkpoints (loaded with weights_only=True).
    """

    def __init__(
        self,
        suspect: str | list[str],
        anchor: str | None = None,
        model_name: str | None = None,
        name: str | None = None,
        component: str | None = None,
        trigger_length: int = 1,
        position: int = 1,
        end_restarts: int = 0,
        restarts: int = 4,
        pooled_restarts: int | None = None,
        beta: float = 0.1,
        gamma: float = 0.1,
        pooled_gamma: float = 0.1,
        null_restarts: int = 0,
        null_charge: float = 1.0,
        null_min_steps: int = 60,
        token_null_restarts: int = 1,
        typed_probe: int = 8,
        anchor_cache: bool = True,
        vocabulary_precision: Precision = "auto",
        alone_in_groups: bool = True, context_in_groups: bool = True,
        lr: float = 0.08, weight_decay: float = 1e-5,
        batch_size: int = 8,
        restarts_per_pass: int | Literal["auto"] | None = "auto",
        probe_prompts: int = 200,
        holdout_prompts: int = 64,
        max_length: int | None = 32,
        check_every: int = 10,
        benign_stop: bool = True,
        benign_stop_speedup: float = 2.0,
        patience: int = 6,
        stall_tol: float = 2e-3,
        rule: DecisionRule | None = None,
        evidence_prompts: int = 8,
        evidence_callbacks: bool = False,
        caption_bank: str | None = None,
        top_captions: int = 5,
        top_tokens: int = 10,
        output_dir: str | None = None,
        cache_dtype: str = "float32",
        save_cache: bool = False,
        seed: int = 0,
        allow_pickle: bool = False,
    ) -> None:
        self.rule = rule or CollapseContrastRule()
        self.judge = self.rule.typing_judge  # makes and judges the typed probe's typings (None: no probe)
        super().__init__(ignore=["rule"])
        self.hparams["rule"] = self.rule.describe()
        self.evidence: dict = {}
        self.typing: TypedProbe | None = None  # the typed-token probe (on_fit_start)
        self.verdict: dict | None = None
        self.probe: list[str] | None = None
        self.holdout: list[str] | None = None
        self._started = 0.0
        self._stage: StagedFolder | None = None

    # ----- models ----------------------------------------------------------------
    def configure_models(self) -> None:
        hp, reads_nulls = self.hparams, isinstance(self.rule, CollapseContrastRule)
        check_scan_options(hp, reads_nulls)
        self.targets = scan_targets(hp.suspect, hp.component, hp.allow_pickle)
        if len(self.targets) > 1:
            return  # several encoders to scan: `lit_amdet.commands.detect` scans each with a model of its own
        target = self.targets[0]
        self.encoder = self._frozen(load_encoder(target.ref, model_name=hp.model_name, allow_pickle=hp.allow_pickle,
                                                 component=target.component, text_only=True))
        self.anchor = None
        if hp.anchor is not None:
            part = anchor_component(hp.anchor, self.encoder.component, hp.allow_pickle)
            self.anchor = self._frozen(load_anchor(hp.anchor, part, hp.model_name, hp.allow_pickle))
            check_same_architecture(self.encoder, self.anchor)
        if not 0 <= hp.position < self.encoder.context_length - hp.trigger_length:
            raise ConfigError(f"position {hp.position} leaves no room for {hp.trigger_length} trigger vectors "
                              f"in a context of {self.encoder.context_length}")
        self.model_label = hp.name or target.label
        # scale of the random init: the spread of real embedding-layer outputs
        ids = torch.arange(min(self.encoder.vocab_size, 2048))[:, None]
        with torch.no_grad():
            scale = float(self.encoder.embed(ids).std())
        nulls = (hp.null_restarts, hp.token_null_restarts if reads_nulls else 0) if self.anchor is not None else (0, 0)
        self.roles = restart_roles(hp.restarts, hp.pooled_restarts, *nulls)  # without an anchor nothing to swap
        self.slots = [hp.position] * len(self.roles) + [END] * (hp.end_restarts + nulls[1] * bool(hp.end_restarts))
        self.roles += restart_roles(hp.end_restarts, 0, 0, nulls[1] * bool(hp.end_restarts))
        if hp.end_restarts and self.encoder.causal:
            raise ConfigError(f"end_restarts: {self.encoder.family} is causal, so only its end token would see a "
                              "trigger typed at the end; use position instead")
        self.judged = [i for i, role in enumerate(self.roles) if role not in YARDSTICKS]
        table = float(self.encoder.token_embedding(ids).std())  # the end restarts' vectors are table rows
        self.trigger = PseudoTrigger(len(self.roles), hp.trigger_length, self.encoder.width,
                                     torch.tensor([[[scale if s != END else table]] for s in self.slots]), hp.seed)
        self._last_stats: list[dict] = []
        self.search: SearchControl | None = None  # made at fit start, when the step limit is known
        self._checked_at = -1

    @staticmethod
    def _frozen(adapter: TextEncoderAdapter) -> TextEncoderAdapter:
        return adapter.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # the encoders never train: no dropout while the trigger is searched
        if self.anchor is not None:
            self.anchor.eval()
        return self

    def configure_optimizers(self):
        return torch.optim.Adam(self.trigger.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ----- prompts and the feature cache -------------------------------------------
    def use_prompts(self, datamodule) -> None:
        """Take the probe and held-out prompts from a `TextEncoderDataModule` (or anything with ``prompts``)."""
        datamodule.setup("fit")
        self.probe = datamodule.prompts("train", limit=self.hparams.probe_prompts)
        self.holdout = datamodule.prompts("val", limit=self.hparams.holdout_prompts)
        if not self.probe:
            raise ConfigError("no probe prompts: the prompt source is empty")
        if len(self.holdout) < 2:
            raise ConfigError(f"only {len(self.holdout)} held-out prompt(s): raise data.val_fraction or add prompts")
        self.caption_bank = caption_bank(self.hparams.caption_bank, self.probe + self.holdout)  # fails before search

    @property
    def several(self) -> bool:
        """True when ``suspect`` names more than one encoder to scan (see `lit_amdet.screening`)."""
        return len(self.targets) > 1

    def share_prompts(self, other: "BackdoorDetection") -> None:
        """Take the prompts ``other`` already took (the scans of one screening share them)."""
        self.probe, self.holdout, self.caption_bank = other.probe, other.holdout, other.caption_bank

    def setup(self, stage: str) -> None:
        if self.several:
            raise ConfigError(f"{len(self.targets)} encoders to scan: run them through lit-amdet detect "
                              "(lit_amdet.commands.detect), one model each")
        if self.probe is None:
            dm = getattr(self.trainer, "datamodule", None)
            if dm is None:
                raise ConfigError("the scan needs prompts: give a data: section (a TextEncoderDataModule)")
            self.use_prompts(dm)

    def on_fit_start(self) -> None:
        self._started = time.perf_counter()
        hp, dtype = self.hparams, getattr(torch, self.hparams.cache_dtype)
        # every process caches every prompt once (the probe set is small; sampler shards change per epoch)
        self.train_cache = FeatureCache.build(self.encoder, self.probe, hp.max_length, dtype=dtype,
                                              room=hp.trigger_length)
        self.holdout_cache = FeatureCache.build(self.encoder, self.holdout, hp.max_length, dtype=dtype,
                                                room=hp.trigger_length)
        self.per_pass = hp.restarts_per_pass if hp.restarts_per_pass != "auto" else restarts_per_pass_for(
            hp.batch_size, self.train_cache.tokens.input_ids.shape[1], self.encoder.width, self.encoder.depth,
            towers=1 if self.anchor is None else 2)  # what the search runs: `auto` sized for this tower
        self.search = SearchControl(len(self.roles), hp.check_every, self.trainer.max_steps, hp.patience, hp.stall_tol,
                                    hp.benign_stop, hp.benign_stop_speedup,
                                    {r: hp.null_min_steps for r, role in enumerate(self.roles)
                                     if role in ("charged", "null")},
                                    tuple(r for r, role in enumerate(self.roles) if role in YARDSTICKS))
        probe = self.anchor is not None and self.judge is not None and hp.typed_probe > 0
        self.typing = TypedProbe(self.encoder, self.anchor, self.holdout_cache.tokens, hp.position, hp.typed_probe,
                                 hp.anchor_cache, probe, probe_contexts(self.holdout), hp.vocabulary_precision,
                                 hp.alone_in_groups, hp.context_in_groups)
        rank_zero_info(f"feature cache: {len(self.train_cache)} probe + {len(self.holdout_cache)} held-out prompts, "
                       f"{(self.train_cache.nbytes + self.holdout_cache.nbytes) / 2**20:.1f} MiB in memory")
        self._baselines()  # before the first step: it says whether the swapped restarts are needed at all
        self.typing.make("rows", self.judge)  # cheap: no vocabulary pass; judged at the drift _baselines measured

    def train_dataloader(self) -> DataLoader:
        if self.probe is None:
            raise ConfigError("no probe prompts attached (use lit-amdet detect, or give a data: section)")
        n = len(self.probe)
        return DataLoader(torch.arange(n), batch_size=min(self.hparams.batch_size, n), shuffle=True,
                          drop_last=n > self.hparams.batch_size)

    # ----- the search ---------------------------------------------------------------
    def _run(self, cache: FeatureCache, rows, vectors: Tensor | None, with_anchor: bool = True,
             restarts: list[int] | None = None):
        """``vectors`` (None: the clean prompts), each at its restart's slot (``restarts``: default all, in order)."""
        slots = [self.hparams.position] if vectors is None else [self.slots[r] for r in restarts or range(len(vectors))]
        return run_slotted(self.encoder, self.anchor, cache.batch(rows), vectors, slots, with_anchor)

    def training_step(self, rows: Tensor, batch_idx: int) -> Tensor:
        if not self.search.active:  # every restart dropped, and the trainer refused to stop (min_steps)
            return None
        per, assimilation, loss = step_in_passes(self.trigger.vectors, self.search.active, self.per_pass,
                                                 functools.partial(self._restart_losses, rows))
        self.log("train/loss_best_restart", per.min(), prog_bar=True)
        self.log("train/loss_mean", per.mean())
        self.log("train/assimilation", assimilation)
        return loss

    def _restart_losses(self, rows: Tensor, vectors: Tensor, restarts: list[int]) -> tuple[Tensor, Tensor]:
        """Each of ``restarts``' loss on the probe ``rows`` ([len(restarts)]) and their mean assimilation."""
        out = self._run(self.train_cache, rows, vectors, restarts=restarts)
        hp, roles = self.hparams, [self.roles[r] for r in restarts]
        return role_losses(out, roles, hp.beta, hp.gamma, hp.pooled_gamma, hp.null_charge), out.assimilation.mean()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.search.restore(self.trigger.vectors)
        step = self.global_step
        if step % RELEASE_EVERY == 0:
            release_free_memory()  # freed activations back to the OS, or a large encoder's resident set creeps up
        # one check per optimiser step (with gradient accumulation several batches share a step)
        if self.hparams.check_every <= 0 or step % self.hparams.check_every or step == self._checked_at:
            return
        self._checked_at = step
        stats = self._check()
        best = int(torch.tensor([s["loss"] for s in stats]).argmin())
        s = stats[best]
        for key in ("loss", "assimilation", "assimilation_ratio", "same_target_ratio", "anchor_cos"):
            if s.get(key) is not None:
                self.log(f"check/{key}", float(s[key]), rank_zero_only=True)
        scored, decisions, progress = self._judge(stats)
        # the probe's vocabulary passes are made only for a model not flagged yet
        passed = any(self.rule.search_passed(scored[i]) for i in self.judged) or self.typing.until_flagged(self.judge)
        reason = self.search.check(step, [st["loss"] for st in stats], passed=passed,
                                   flagged={i for i in self.judged if decisions[i]["backdoored"]}, progress=progress)
        self.search.hold(self.trigger.vectors)
        if reason:
            self.evidence["stopped_early"] = reason
            self.trainer.should_stop = True

    def _judge(self, stats: list[dict]) -> tuple[list[dict], list[dict], list[float | None]]:
        """Every restart's scores (with `attach_null`), the rule's decision and progress (`judge_restarts`)."""
        scored = attach_null([self._with_baselines(st) for st in stats], self.roles, self.slots)
        return (scored, *judge_restarts(self.rule, scored, self.roles))

    def _check(self) -> list[dict]:
        """Held-out scores of every restart: the active ones evaluated now, the dropped ones as last measured
        (their triggers no longer move)."""
        active = self.search.active
        fresh = self.evaluate(self.trigger.vectors.detach()[active], restarts=active)
        stats = list(self._last_stats) or [{} for _ in self.roles]
        for r, st in zip(active, fresh):
            stats[r] = st
        self._last_stats = stats
        return stats

    @torch.no_grad()
    def evaluate(self, vectors: Tensor | None, restarts: list[int] | None = None) -> list[dict]:
        """Held-out scores per row of ``vectors`` (one dict each; None = clean prompts), summed over processes.

        ``restarts``: the restart each row is (default: every restart, in order, when there are as many rows),
        so the pooled restarts' held-out loss is their own objective."""
        hp = self.hparams
        cache = self.holdout_cache
        reps = 1 if vectors is None else vectors.shape[0]
        ref = self._run(cache, slice(0, 1), vectors, False, restarts).prompt_feature  # [R, W]
        world, rank = self.trainer.world_size if self._trainer else 1, self.global_rank if self._trainer else 0
        rows = torch.arange(len(cache))[rank::world]
        sums = torch.zeros(reps, len(HELD_OUT_SUMS), device=self.device, dtype=torch.float64)
        pooled = torch.zeros(reps, self.encoder.embed_dim, device=self.device, dtype=torch.float64)
        anchor_pooled = torch.zeros_like(pooled)
        feature = torch.zeros(reps, self.encoder.width, device=self.device, dtype=torch.float64)
        bs = max(1, 4 * hp.batch_size // reps)
        for i in range(0, len(rows), bs):
            out = self._run(cache, rows[i:i + bs], vectors, restarts=restarts)
            b = len(rows[i:i + bs])
            same = (out.prompt_feature.view(reps, b, -1) * ref[:, None]).sum(-1)  # [R, B]
            loss = out.loss(hp.beta, hp.gamma, hp.pooled_gamma)
            cols = [torch.ones(reps, b, device=self.device), per_restart(loss, reps),
                    per_restart(out.assimilation, reps),
                    per_restart((out.assimilation > self.rule.assimilation_threshold).float(), reps),
                    same, (same > self.rule.same_target_cos).float()]
            if out.anchor_cos is not None:
                cols += [per_restart(out.anchor_cos, reps), per_restart((out.anchor_cos < 0).float(), reps),
                         per_restart(out.anchor_assimilation, reps), per_restart(out.anchor_pooled_cos, reps)]
            else:
                cols += [torch.zeros(reps, b, device=self.device)] * 4
            cols.append(per_restart(out.orig_cos, reps))
            sums += torch.stack([c.to(self.device).double().sum(1) for c in cols], dim=1)
            pooled += F.normalize(out.pooled, dim=-1).view(reps, b, -1).sum(1).double()
            if out.anchor_pooled is not None:
                anchor_pooled += F.normalize(out.anchor_pooled, dim=-1).view(reps, b, -1).sum(1).double()
            feature += out.prompt_feature.view(reps, b, -1).sum(1).double()
        if world > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            pooled = self.trainer.strategy.reduce(pooled, reduce_op="sum")
            anchor_pooled = self.trainer.strategy.reduce(anchor_pooled, reduce_op="sum")
            feature = self.trainer.strategy.reduce(feature, reduce_op="sum")
        results = held_out_results(sums, pooled, anchor_pooled, feature, self.anchor is not None)
        if restarts is None and vectors is not None and reps == len(self.roles):
            restarts = list(range(reps))
        for r, res in zip(restarts or [], results):
            loss = held_out_loss(self.roles[r], res, hp.pooled_gamma, hp.null_charge, hp.gamma)
            res["loss"] = res["loss"] if loss is None else loss
        return results

    def _with_baselines(self, s: dict) -> dict:
        return with_baselines(s, self.evidence.get("baselines") or self._baselines(), self.anchor is not None,
                              getattr(self.rule, "drift_floor", DRIFT_FLOOR))

    def _baselines(self) -> dict:
        clean = self.evaluate(None)[0]
        random = self.evaluate(self.trigger.initial)
        keys = ("assimilation", "anchor_cos", "anchor_assimilation", "anchor_pooled_cos", "orig_cos",
                "target_consistency", "anchor_target_consistency")
        # the yardsticks' random triggers are not the suspect's; the end restarts' are not at the position
        searched = [random[i] for i in self.judged if self.slots[i] == self.hparams.position]
        rnd = {k: (sum(r[k] for r in searched) / len(searched) if random[0][k] is not None else None) for k in keys}
        self.evidence["baselines"] = base = finite_baselines({"clean": {k: clean[k] for k in keys}, "random": rnd})
        self.typing.clean_cos = base["clean"]["anchor_pooled_cos"]
        self._last_stats = self._last_stats or list(random)  # a restart dropped before its first check
        # where each restart's progress starts: its own random trigger, scored as every check will be
        if self.search is not None:
            self.search.start(self._judge(random)[2])
            if not self.rule.charged_path_open(base["clean"]["anchor_pooled_cos"]):
                self.search.kept_until = {}  # far from the anchor the charged restarts cannot count: no minimum
            else:  # near it the token path is not judged against the swapped search: never run that one
                self.search.drop([r for r, role in enumerate(self.roles) if role == "token_null"], self.global_step)
                self.search.hold(self.trigger.vectors)
                self.typing.near_anchor()
        return base

    # ----- after the search -----------------------------------------------------------
    def on_train_end(self) -> None:
        # a search that ended at a check (every shipped one does) has every restart's scores for its final triggers
        done = self._checked_at == self.global_step and len(self._last_stats) == len(self.roles)
        stats, decisions, progress = self._judge(self._last_stats if done else
                                                 self.evaluate(self.trigger.vectors.detach()))
        losses = [s["loss"] for s in stats]
        # the restarts that passed the search's checks, else any the rule flags (a pooled restart's backdoor may not
        # share one token target), else any it cannot clear (a token collapse the swapped search matches)
        passed = [i for i in self.judged if self.rule.search_passed(stats[i])] or \
            [i for i in self.judged if decisions[i]["backdoored"]] or \
            [i for i in self.judged if verdict_of(decisions[i]) == INCONCLUSIVE]
        best = choose_restart([loss if i in self.judged else math.inf for i, loss in enumerate(losses)], passed)
        if decisions[best]["backdoored"]:
            self.typing.skip_passes("the model was flagged already")
        # a search that ended before its first check, or a flag lost since: the verdict may rest on the passes
        self.typing.until_flagged(self.judge)
        self.evidence["restart_scores"] = restart_summary(stats, decisions, progress,
                                                          [OBJECTIVES[role] for role in self.roles],
                                                          self.search.dropped, self.slots)
        self.best_restart = best
        chosen = stats[best]
        self.evidence.update(restart_losses=losses, passing_restarts=passed, best_restart=best, steps=self.global_step)
        self.evidence["scores"] = {**{k: v for k, v in chosen.items() if not k.startswith("_")},
                                   **verdict_scores(self.typing.typings, self.judge, self.typing.clean_cos)}
        self._target_pooled, self._target_feature = chosen["_pooled"], chosen["_feature"]
        self._stage = None
        if self.trainer.is_global_zero:  # figures and files gather here; renamed to the run folder at the end
            self._stage = StagedFolder(self._output_dir(), prefix=".detect-")
            self._stage.open()

    def discard_staging(self) -> None:
        """Remove the staging folder if the run folder was never completed."""
        if self._stage is not None:
            self._stage.discard()
        self._stage = None

    def best_trigger(self) -> Tensor:
        return self.trigger.vectors.detach()[self.best_restart]

    def evidence_point(self):
        """(best trigger [k, W], batched loss on the evidence prompts, folder for figures) for the callbacks."""
        cache, hp = self.holdout_cache, self.hparams
        rows = slice(0, min(hp.evidence_prompts, len(cache)))
        batch = cache.batch(rows)
        per_call = max(1, 1024 // len(batch))

        def loss_fn(triggers: Tensor) -> Tensor:
            out = []
            for i in range(0, len(triggers), per_call):
                res = run_triggered(self.encoder, self.anchor, batch, triggers[i:i + per_call],
                                    self.slots[self.best_restart])
                loss = res.loss(hp.beta, hp.gamma, hp.pooled_gamma)
                out.append(per_restart(loss, len(triggers[i:i + per_call])).mean(1))
            return torch.cat(out)

        return self.best_trigger(), loss_fn, self._stage.path if self._stage is not None else None

    def _output_dir(self) -> Path:
        if self.hparams.output_dir:
            return Path(self.hparams.output_dir)
        return Path(self.trainer.default_root_dir) / "detect" / self.model_label

    def on_fit_end(self) -> None:
        scores = dict(self.evidence["scores"])
        if "landscape" in self.evidence:
            scores["landscape_positive_ratio"] = self.evidence["landscape"]["positive_ratio"]
        if "hessian" in self.evidence:
            hessian = self.evidence["hessian"]
            scores.update(hessian_top=hessian["top"][0], hessian_bottom=hessian["bottom"][0],
                          hessian_negative_ratio=hessian["negative_ratio"])
        decision = decide_finite(self.rule, scores)  # never clean on NaN scores
        self.verdict = {"model": self.model_label, **decision, "verdict": verdict_of(decision), "scores": scores}
        if self.trainer.is_global_zero:
            self._write_run_folder(decision, scores)

    def _write_run_folder(self, decision: dict, scores: dict) -> None:
        hp, stage, slot = self.hparams, self._stage.path, self.slots[self.best_restart]
        trigger = self.best_trigger().float().cpu()
        inversion = save_trigger_files(stage, self.encoder, self.trigger.vectors, self.best_restart,
                                       self._target_pooled, self._target_feature, slot, hp.suspect)
        if hp.save_cache:
            self.holdout_cache.save(stage / "holdout_features.safetensors")
        tokens = nearest_tokens(self.encoder, trigger.to(self.device), slot, hp.top_tokens)
        typing = deciding_typing(self.typing.typings, self.judge, scores)  # a typed token decided alone: its target
        target = self._target_pooled if typing is None else typed_target(
            self.encoder, self.holdout_cache.tokens, typing["ids"], typing.get("position", hp.position))
        known = {**self.train_cache.pooled(self.encoder), **self.holdout_cache.pooled(self.encoder)}  # not run again
        captions = nearest_captions(self.encoder, self.caption_bank, target, hp.max_length, hp.top_captions, known)
        report = {
            "model": self.model_label, "verdict": self.verdict["verdict"],
            "backdoored": decision["backdoored"], "rule": self.rule.describe(), "decided_by": decision["decided_by"],
            "checks": decision["checks"], "scores": scores,
            "suspect": {"path": self.targets[0].ref, "sha256": file_sha256(self.encoder.source_path)
                        if self.encoder.source_path else None, "component": self.encoder.component,
                        "origin": self.encoder.origin, **self.encoder.describe()},
            "anchor_used": self.anchor is not None,
            "anchor": {"path": str(hp.anchor), "sha256": file_sha256(self.anchor.source_path)
                       if self.anchor.source_path else None, "component": self.anchor.component,
                       "origin": self.anchor.origin} if self.anchor is not None else None,
            "notes": [] if self.anchor is not None else
            ["no anchor given: the gamma term and the suspect-vs-anchor contrast checks were off; the verdict rests "
             "on the suspect alone and cannot separate an injected backdoor from a strong natural one"],
            "seconds": time.perf_counter() - self._started, "seed": hp.seed, "steps": self.evidence.get("steps"),
            "stopped_early": self.evidence.get("stopped_early"), "restarts": hp.restarts,
            "best_restart": self.evidence.get("best_restart"), "restart_losses": self.evidence.get("restart_losses"),
            "passing_restarts": self.evidence.get("passing_restarts"),
            "restart_scores": self.evidence.get("restart_scores"), "typed_probe": self.typing.typings,
            "typed_probe_lists": self.typing.lists, "typed_probe_contexts": self.typing.contexts,
            "progress_at_checks": self.search.progress,
            "baselines": self.evidence.get("baselines"), "landscape": self.evidence.get("landscape"),
            "hessian": self.evidence.get("hessian"), "nearest_tokens": tokens, "nearest_captions": captions,
            "nearest_captions_of": "search" if typing is None else f"typed token {typing['token']!r}",
            "trigger": {"length": hp.trigger_length, "position": slot, "norm": float(trigger.norm()),
                        "textual_inversion": "learned_embeds.safetensors" if inversion else None},
            "prompts": {"probe": len(self.probe), "held_out": len(self.holdout)},
            "world_size": self.trainer.world_size, "precision": str(self.trainer.precision),
            "restarts_per_pass": min(self.per_pass or len(self.roles), len(self.roles)),  # what ran
            "hyperparameters": {k: v for k, v in hp.items() if k != "rule"},
        }
        self.report = report
        write_json(stage / "report.json", report)
        self.run_dir = self._stage.commit()  # the run folder appears complete or not at all
        self._stage = None

    def configure_callbacks(self):
        from lit_amdet.callbacks import HessianSpectrum, LossLandscape

        if not (self.hparams.evidence_callbacks or self.rule.reads_evidence):
            return []
        have = {type(c) for c in self.trainer.callbacks} if self._trainer is not None else set()
        # the evidence callbacks are part of the scan: added with defaults unless the config gives its own
        return [cb() for cb in (LossLandscape, HessianSpectrum) if cb not in have]
