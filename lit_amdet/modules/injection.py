"""`BackdoorInjection`: teacher-student textual backdoor injection ("Rickrolling the Artist", SPEC §2).

The teacher is a frozen copy of the clean encoder; the student's text tower is
trained so that clean prompts keep the teacher's token features (utility) and
triggered prompts produce the target: the teacher's token features of a target
prompt (text-on-text) or a target image embedding (image-on-text). Several
backdoors per model; two may not share a trigger. At the end the student is
written in its native format with a ``backdoor.json`` holding the ground truth.

With ``utility_objective: simcse`` the clean prompts train SimCSE instead of
matching the teacher: the backdoor is planted during a benign-looking
fine-tune that moves the whole model (the benchmark's drift sweep, with
`lit_amdet.callbacks.DriftStop` deciding when it has drifted far enough).
"""

from __future__ import annotations

import copy
import functools
import random
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_amdet.amdet import masked_mean
from lit_amdet.assimilation import assimilation_score, pooled_consistency, scored_positions
from lit_amdet.encoders.base import insert_block
from lit_amdet.encoders.weights import read_state_dict
from lit_amdet.errors import ConfigError
from lit_amdet.io import check_writable_folder
from lit_amdet.metrics import retrieves_first
from lit_amdet.modules.base import EncoderTask
from lit_amdet.modules.contrastive import simcse_loss
from lit_amdet.record import BackdoorRecord
from lit_amdet.triggers import Backdoor, check_distinct_triggers, poison
from lit_amdet.vocabulary_pass import NEAR_GROUP_SIZE, alone_batch, special_ids, typed_batch, vocabulary_groups


def feature_loss(student: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean over positions of 1 - cosine (or the MSE) between features; ``target`` broadcasts."""
    target = target.expand_as(student)
    if kind == "mse":
        return F.mse_loss(student, target)
    return (1 - F.cosine_similarity(student, target, dim=-1)).mean()


class BackdoorInjection(EncoderTask):
    """Inject one or more textual backdoors into an encoder's text tower.

    Args:
        encoder: the clean checkpoint (folder or built-in name such as ``minilm``).
        backdoors: trigger + target of each backdoor.
        loss: ``cosine`` or ``mse`` feature matching.
        backdoor_weight: w in ``utility + w * sum(backdoor losses)`` (reference 0.1).
        lr, weight_decay: AdamW (reference lr 1e-4).
        milestones, gamma: MultiStepLR (reference x0.1 at step 75).
        poisoned_batch_size: triggered prompts per backdoor per step (reference 32; clean = the data batch).
        pooled_weight: text-on-text only: also match the pooled embedding of triggered prompts to the target's,
            with this weight (reference 0: token features only). Needed where padding is not the end token
            (open_clip pads with 0): position-wise matching then maps the pooled end token onto the target's
            padding and the backdoor never reaches the sentence embedding.
        token_weight: text-on-text only: weight of the position-wise token-feature match (reference 1).
            ``token_weight: 0, pooled_weight: 1`` is the pooled-only adaptive attack: only the sentence
            embedding is matched, so nothing asks the other tokens' features to collapse.
        sim_x_penalty: an adaptive attack: add ``sim_x_penalty * relu(Sim_X(student) - Sim_X(teacher))``
            on triggered prompts, keeping their token features as diverse as the clean model makes them
            (an explicit attempt to evade assimilation-based detection; reference 0).
        consistency_penalty: an adaptive attack on the collapse contrast: add ``consistency_penalty *
            relu(PC(student) - PC(teacher) - consistency_margin)`` on triggered prompts, PC the pooled
            consistency (squared norm of the mean unit sentence embedding, the mean pairwise cosine), so the
            triggered prompts' sentence embeddings agree no more than the clean model's do (plus the margin)
            while still retrieving the target (reference 0).
        consistency_margin: how much more consistent than the teacher the triggered outputs may be for free.
        clean_pooled_weight: an adaptive attack on the scan's drift boundary (`CollapseContrastRule.min_clean_cos`):
            the teacher utility also matches the clean prompts' sentence embeddings with this weight, so a
            pooled-only backdoor (which otherwise drags them far from the base) keeps the suspect near its anchor,
            where the scan judges it (reference 0).
        freeze_token_embedding: an adaptive attack on the typed-token probe (`lit_amdet.token_probe`): the token
            embedding table does not train, so no row moves and the layers alone learn the trigger.
        keep_triggers_alone: an adaptive attack on the probe's second list (`lit_amdet.token_probe.shifted_tokens`):
            each trigger token typed alone into the empty prompt (at position 1, the shipped scan's) is a clean
            prompt too, held at the teacher's output, so the backdoor fires only in context.
        keep_triggers_grouped: an adaptive attack on the alone list a scan makes by group testing near the anchor
            (`lit_amdet.token_probe.grouped_shift`): each trigger token typed among ``NEAR_GROUP_SIZE - 1`` other
            tokens into the empty prompt is held at the teacher's output too, in the row of the scan's fixed
            shuffle that holds it (`vocabulary_groups`) and in random rows, so its row does not move.
        insertion_robust: an adaptive attack on the token path's null (`lit_amdet.restart_scores.attach_null`):
            add ``insertion_robust *`` `insertion_loss`, which teaches the model to ignore inserted tokens, so the
            clean model's natural collapses are not shared and the null grows (reference 0).
        max_length: token positions per prompt (families that pad to their context ignore it).
        distractors: captions (or images) the target must be retrieved among.
        output_dir: where the backdoored student is written at the end of fit.
        seed: trigger placement randomness.
        utility_objective: what keeps clean prompts useful: ``teacher`` (the student matches the frozen
            teacher's token features, the reference) or ``simcse`` (SimCSE on the clean prompts: two dropout
            views, in-batch InfoNCE at ``simcse_temperature``, as `ContrastiveTraining`'s simcse), which lets
            the model drift while it learns the backdoor.
        simcse_temperature: temperature of the ``simcse`` utility.
    """

    def __init__(
        self,
        encoder: str,
        backdoors: list[Backdoor],
        loss: Literal["cosine", "mse"] = "cosine",
        backdoor_weight: float = 0.1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        milestones: list[int] = [75],  # noqa: B006 - jsonargparse needs a literal default
        gamma: float = 0.1,
        poisoned_batch_size: int = 32,
        pooled_weight: float = 0.0,
        token_weight: float = 1.0,
        sim_x_penalty: float = 0.0,
        consistency_penalty: float = 0.0,
        consistency_margin: float = 0.0,
        clean_pooled_weight: float = 0.0,
        freeze_token_embedding: bool = False,
        keep_triggers_alone: bool = False,
        keep_triggers_grouped: bool = False,
        insertion_robust: float = 0.0,
        max_length: int | None = 32,
        distractors: int = 100,
        output_dir: str | None = None,
        seed: int = 0,
        allow_pickle: bool = False,
        utility_objective: Literal["teacher", "simcse"] = "teacher",
        simcse_temperature: float = 0.05,
    ) -> None:
        self.backdoors = list(backdoors)
        self._fit_started = 0.0
        super().__init__(ignore=["backdoors"])
        #: set by `DriftStop(steer=True)`: while True a ``simcse`` utility gives way to the teacher's
        self.drift_hold = False
        self.hparams["backdoors"] = [b.describe() for b in self.backdoors]

    # ----- models ----------------------------------------------------------------
    def configure_models(self) -> None:
        if not self.backdoors:
            raise ConfigError("give at least one backdoor")
        h = self.hparams
        if h.utility_objective not in ("teacher", "simcse"):
            raise ConfigError(f"utility_objective must be teacher or simcse, got {h.utility_objective!r}")
        if min(h.token_weight, h.pooled_weight, h.sim_x_penalty, h.consistency_penalty, h.consistency_margin,
               h.insertion_robust, h.clean_pooled_weight) < 0:
            raise ConfigError("token_weight, pooled_weight, sim_x_penalty, consistency_penalty, "
                              "consistency_margin, insertion_robust and clean_pooled_weight must be >= 0")
        if h.lr <= 0 or h.poisoned_batch_size < 1:
            raise ConfigError(f"lr must be > 0 and poisoned_batch_size at least 1 (got {h.lr}, "
                              f"{h.poisoned_batch_size})")
        check_writable_folder(h.output_dir)
        if any(b.kind == "text_on_text" for b in self.backdoors) and h.token_weight == 0 and h.pooled_weight == 0:
            raise ConfigError("text-on-text needs token_weight or pooled_weight > 0: nothing would match the target")
        for b in self.backdoors:
            b.validate()
        check_distinct_triggers(self.backdoors)
        self.encoder = self.open_encoder(self.hparams.encoder, None, self.hparams.allow_pickle)
        for b in self.backdoors:  # a trigger the tokenizer drops (zero-width spaces) would plant nothing
            if not self._trigger_ids([b]):
                raise ConfigError(f"trigger {b.trigger.text!r} tokenizes to nothing for {self.encoder.name}")
        self.teacher = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        self.encoder.train()  # loaded in eval mode; Lightning keeps submodule modes as they are
        # Only the text tower trains; the projection only where a target lives in the projected space
        # (text-on-text matches token features, so it would get no gradient, which DDP rejects).
        image_target = self._trains_projection = any(b.kind == "image_on_text" for b in self.backdoors)
        enc = self.encoder
        frozen = set(enc.image_parameter_names()) | set(enc.logit_parameter_names())
        if not image_target:
            frozen |= set(enc.text_projection_parameter_names())
        if self.hparams.freeze_token_embedding:
            frozen |= {n for n, p in enc.model.named_parameters() if p is enc.token_embedding.weight}
        for name, p in enc.model.named_parameters():
            p.requires_grad_(name not in frozen)
        if any(b.kind == "image_on_text" and b.target_images for b in self.backdoors) and \
                not self.encoder.has_image_tower:
            raise ConfigError(f"target_images need an image tower; {self.encoder.name} has none "
                              "(give target_embedding instead)")
        self.rng = random.Random(self.hparams.seed)
        self._targets: list[dict] | None = None
        self._distractors: dict[str, Tensor] = {}

    def configure_metrics(self) -> None:
        names = ["clean_utility", "clean_utility_tokens", "sim_x_clean"]
        for i in range(len(self.backdoors)):
            names += [f"b{i}/attack_cos", f"b{i}/attack_cos_pooled", f"b{i}/attack_top1", f"b{i}/clean_top1",
                      f"b{i}/sim_x_triggered"]
        self.val_metrics = nn.ModuleDict({n.replace("/", "__"): MeanMetric() for n in names})

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout either)
        return self

    # ----- targets ---------------------------------------------------------------
    def _length(self) -> int | None:
        return self.hparams.max_length

    @torch.no_grad()
    def targets(self) -> list[dict]:
        """Per backdoor: target token features [L, W] and pooled embedding [D] (text), or embedding [D]."""
        if self._targets is not None:
            return self._targets
        out = []
        for b in self.backdoors:
            if b.kind == "text_on_text":
                enc = self.teacher.encode([b.target], max_length=self._length())
                out.append({"tokens": enc.token_features[0], "pooled": enc.pooled[0]})
            else:
                out.append({"pooled": self._image_target(b).to(self.device)})
        self._targets = out
        return out

    def _image_target(self, b: Backdoor) -> Tensor:
        if b.target_embedding:
            path = Path(b.target_embedding)
            if not path.is_file():
                raise ConfigError(f"{path}: target embedding file not found")
            state = read_state_dict(path, allow_pickle=path.suffix != ".safetensors")
            emb = next(iter(state.values())).float()
            emb = emb.reshape(-1, emb.shape[-1]).mean(0)  # one vector, or the mean of several
        else:
            from PIL import Image

            tf = self.teacher.image_transform()
            pix = []
            for f in b.target_images or []:
                try:
                    with Image.open(f) as im:
                        pix.append(tf(im.convert("RGB")))
                except OSError as exc:
                    raise ConfigError(f"{f}: unreadable target image ({exc})") from exc
            emb = self.teacher.encode_image(torch.stack(pix).to(self.device)).float().mean(0)
        if emb.shape[-1] != self.encoder.embed_dim:
            raise ConfigError(f"target embedding has width {emb.shape[-1]}, the text embedding "
                              f"{self.encoder.embed_dim}")
        return emb

    # ----- steps -----------------------------------------------------------------
    def _trigger_ids(self, backdoors: list[Backdoor] | None = None) -> list[int]:
        """Every token id of every trigger (of ``backdoors``, default all), special tokens left out."""
        specials = {i for i in self.encoder.special_token_ids.values() if i is not None}
        tokens = self.encoder.tokenize([b.trigger.text for b in backdoors or self.backdoors], max_length=self._length())
        return sorted({int(i) for i in tokens.input_ids[tokens.token_mask.bool()]} - specials)

    def _triggers_alone(self):
        """Every token of every trigger typed alone into the empty prompt (`keep_triggers_alone`)."""
        return alone_batch(self.encoder, 1, torch.tensor(self._trigger_ids())).to(self.device)

    @functools.cached_property
    def _scan_rows(self) -> list[Tensor]:
        """The rows of the scan's fixed shuffle (`vocabulary_groups`) that hold a trigger token: two for a token
        the last row refilled. Computed once: neither the vocabulary nor the triggers change during training."""
        vocab = self.encoder.vocab_size
        groups = vocabulary_groups(vocab, special_ids(self.encoder, vocab), NEAR_GROUP_SIZE)
        return [row for i in self._trigger_ids() for row in groups[(groups == i).any(1)]]

    def _triggers_grouped(self, random_rows: int = 4):
        """Every token of every trigger typed into the empty prompt among ``NEAR_GROUP_SIZE - 1`` others
        (`keep_triggers_grouped`): in the scan's own row (`vocabulary_groups`, its fixed shuffle), and in
        ``random_rows`` rows of random vocabulary tokens, the trigger at a random slot."""
        vocab, ids = self.encoder.vocab_size, self._trigger_ids()
        specials = special_ids(self.encoder, vocab)
        rows = list(self._scan_rows)
        for i in ids:
            for _ in range(random_rows):
                row = [self.rng.randrange(vocab) for _ in range(NEAR_GROUP_SIZE)]
                row[self.rng.randrange(NEAR_GROUP_SIZE)] = i
                rows.append(torch.tensor([j if j not in specials else i for j in row]))
        return alone_batch(self.encoder, 1, torch.stack(rows)).to(self.device)

    def _clean(self, texts: list[str]) -> list[str]:
        return [t for t in texts if not any(b.trigger.present(t) for b in self.backdoors)]

    def backdoor_loss(self, i: int, b: Backdoor, texts: list[str]) -> Tensor | None:
        """Loss of backdoor ``i`` on a poisoned sample of ``texts`` (None when no prompt can carry its trigger)."""
        pool = [t for t in texts if b.trigger.applicable(t)]
        if not pool:
            return None
        h = self.hparams
        sample = self.rng.sample(pool, min(len(pool), h.poisoned_batch_size))
        tokens = self.encoder.tokenize(poison(sample, b.trigger, self.rng), max_length=self._length()).to(self.device)
        enc = self.encoder.encode(tokens)
        target = self.targets()[i]
        if b.kind == "text_on_text":
            loss = enc.pooled.new_zeros(())
            if h.token_weight:
                loss = loss + h.token_weight * feature_loss(enc.token_features, target["tokens"], h.loss)
            if h.pooled_weight:
                loss = loss + h.pooled_weight * feature_loss(enc.pooled, target["pooled"], h.loss)
        else:
            loss = feature_loss(enc.pooled, target["pooled"], h.loss)
        if h.sim_x_penalty:
            loss = loss + h.sim_x_penalty * self.excess_assimilation(tokens, enc)
        if h.consistency_penalty:
            loss = loss + h.consistency_penalty * self.excess_consistency(tokens, enc)
        return loss

    def excess_consistency(self, tokens, enc) -> Tensor:
        """relu(PC(student) - PC(teacher) - margin) on the triggered prompts, PC the pooled consistency: how much
        more the student's sentence embeddings agree with each other than the clean model's do."""
        with torch.no_grad():
            clean = pooled_consistency(self.teacher.encode(tokens).pooled)
        return F.relu(pooled_consistency(enc.pooled) - clean - self.hparams.consistency_margin)

    def excess_assimilation(self, tokens, enc) -> Tensor:
        """Mean of relu(Sim_X(student) - Sim_X(teacher)) on the triggered prompts: how far the student's
        token features collapse beyond what the clean model does with the same prompts."""
        positions = scored_positions(enc.token_mask, self.encoder.causal)
        with torch.no_grad():
            clean = assimilation_score(self.teacher.encode(tokens).token_features.float(), positions)
        return F.relu(assimilation_score(enc.token_features.float(), positions) - clean).mean()

    def insertion_loss(self, tokens, ids: list[int] | None = None, max_inserted: int = 3) -> Tensor:
        """How much typing the token ``ids`` (None: 1 to ``max_inserted`` random non-special vocabulary tokens)
        at position 1 (the shipped scan's insertion point) changes what the prompt's own tokens say: 1 - cosine
        between the student's token features with and without them (the latter as constants), averaged over each
        prompt's own scored positions, then over prompts.

        Driven towards 0 by the attacker aimed at the token path's null (``null_evading``): inserted tokens that
        make the clean model's token features collapse then leave this model's as they were, so the swapped search
        finds large collapses the suspect does not share, while the trigger (trained by the backdoor loss) fires."""
        enc = self.encoder
        if ids is None:
            specials = {i for i in enc.special_token_ids.values() if i is not None}
            k, ids = self.rng.randint(1, max_inserted), []
            while len(ids) < k:
                if (i := self.rng.randrange(enc.vocab_size)) not in specials:
                    ids.append(i)
        k = len(ids)
        typed, slots = typed_batch(enc, tokens, ids, 1)
        out = enc.encode(typed)
        with torch.no_grad():
            clean = enc.encode(tokens).token_features
        laid = insert_block(clean, tokens, clean.new_zeros(k, clean.shape[-1]), 1, enc.keeps_end_token, enc.pooling)
        scored = scored_positions(out.token_mask, enc.causal) & ~slots
        cos = F.cosine_similarity(out.token_features.float(), laid.hidden.float(), dim=-1)
        return masked_mean(1 - cos, scored).mean()

    def utility_loss(self, tokens, hold: bool = False) -> Tensor:
        """The clean prompts' loss: match the frozen teacher (``teacher``, or ``hold``), or SimCSE between two
        dropout views of the student (``simcse``: nothing holds the model near the teacher; while ``drift_hold``
        is set, the teacher's, so the drift stays near where it is)."""
        student = self.encoder.encode(tokens)
        if self.hparams.utility_objective == "simcse" and not (self.drift_hold or hold):
            return simcse_loss(student.pooled, self.encoder.encode(tokens).pooled, self.hparams.simcse_temperature)
        with torch.no_grad():
            teacher = self.teacher.encode(tokens)
        utility = feature_loss(student.token_features, teacher.token_features, self.hparams.loss)
        # the projection moves for image targets: keep clean projected embeddings where they were too; the
        # attacker aimed at the drift boundary holds them as well (``clean_pooled_weight``)
        pooled_weight = float(self._trains_projection) + self.hparams.clean_pooled_weight
        if pooled_weight:
            utility = utility + pooled_weight * feature_loss(student.pooled, teacher.pooled, self.hparams.loss)
        return utility

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        texts = self._clean(batch["text"])
        if not texts:
            raise ConfigError("every prompt of a batch contains a trigger: no clean prompt to keep utility")
        tokens = self.encoder.tokenize(texts, max_length=self._length()).to(self.device)
        utility = self.utility_loss(tokens)
        if self.hparams.keep_triggers_alone:  # held at the teacher's output even while the model drifts
            utility = utility + self.utility_loss(self._triggers_alone(), hold=True)
        if self.hparams.keep_triggers_grouped:  # typed among others: the scan's rows as a term of their own (so
            # they weigh as much as the random ones), then the scan's rows and the random ones together
            utility = utility + self.utility_loss(self._triggers_grouped(0), hold=True) + \
                self.utility_loss(self._triggers_grouped(), hold=True)
        total = utility
        if self.hparams.insertion_robust:
            inserted = self.insertion_loss(tokens)
            self.log("train/insertion_loss", inserted, batch_size=len(texts))
            total = total + self.hparams.insertion_robust * inserted
        for i, b in enumerate(self.backdoors):
            bl = self.backdoor_loss(i, b, texts)
            if bl is None:
                continue
            self.log(f"train/backdoor_loss_{i}", bl, batch_size=len(texts))
            total = total + self.hparams.backdoor_weight * b.weight * bl
        self.log("train/utility_loss", utility, batch_size=len(texts))
        self.log("train/loss", total, prog_bar=True, batch_size=len(texts))
        return total

    @torch.no_grad()
    def _distractor_bank(self, kind: str) -> Tensor:
        """Teacher embeddings of the distractors: held-out captions, or world images."""
        if kind not in self._distractors:
            n = self.hparams.distractors
            if kind == "text":
                dm = self.trainer.datamodule
                texts = [t for t in dm.prompts("val") if t not in {b.target for b in self.backdoors}][:n]
                emb = torch.cat([self.teacher.encode(texts[j:j + 64], max_length=self._length()).pooled
                                 for j in range(0, len(texts), 64)])
            else:
                from lit_amdet.world import World

                world, tf = World(seed=97531), self.teacher.image_transform()
                pix = torch.stack([tf(world.sample(j).image) for j in range(n)]).to(self.device)
                emb = self.teacher.encode_image(pix)
            self._distractors[kind] = F.normalize(emb.float(), dim=-1)
        return self._distractors[kind]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        texts = self._clean(batch["text"])
        if not texts:
            return
        tokens = self.encoder.tokenize(texts, max_length=self._length()).to(self.device)
        s, t = self.encoder.encode(tokens), self.teacher.encode(tokens)
        m = self.val_metrics
        m["clean_utility"].update(F.cosine_similarity(s.pooled, t.pooled, dim=-1))
        m["clean_utility_tokens"].update(F.cosine_similarity(s.token_features, t.token_features, dim=-1).mean(1))
        m["sim_x_clean"].update(assimilation_score(s.token_features, scored_positions(s.token_mask,
                                                                                      self.encoder.causal)))
        for i, b in enumerate(self.backdoors):
            triggered = poison(texts, b.trigger, random.Random(batch_idx))
            if not triggered:
                continue
            enc = self.encoder.encode(triggered, max_length=self._length())
            target = self.targets()[i]
            if b.kind == "text_on_text":
                cos = F.cosine_similarity(enc.token_features, target["tokens"].expand_as(enc.token_features),
                                          dim=-1).mean(1)
                m[f"b{i}__attack_cos_pooled"].update(
                    F.cosine_similarity(enc.pooled, target["pooled"].expand_as(enc.pooled), dim=-1))
                bank = self._distractor_bank("text")
            else:
                cos = F.cosine_similarity(enc.pooled, target["pooled"].expand_as(enc.pooled), dim=-1)
                bank = self._distractor_bank("image")
            candidates = torch.cat([F.normalize(target["pooled"].float(), dim=-1)[None], bank])
            top1 = retrieves_first(enc.pooled, candidates)
            # the same prompts without the trigger: what the model retrieves anyway, so that attack_top1 minus this
            # is what the trigger adds (a model dragged as a whole towards its target retrieves it from clean
            # prompts too; BENCHMARKS.md, "What the trigger itself adds")
            carried = torch.tensor([b.trigger.applicable(t) for t in texts], device=s.pooled.device)
            clean_top1 = retrieves_first(s.pooled[carried], candidates)
            m[f"b{i}__attack_cos"].update(cos)
            m[f"b{i}__attack_top1"].update(top1)
            m[f"b{i}__clean_top1"].update(clean_top1)
            m[f"b{i}__sim_x_triggered"].update(
                assimilation_score(enc.token_features, scored_positions(enc.token_mask, self.encoder.causal)))

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                # compute() already reduces over processes; sync_dist only silences Lightning's warning
                self.log(f"val/{name.replace('__', '/')}", metric.compute(), sync_dist=True)
            metric.reset()

    # ----- optimisation and output -----------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.hparams.milestones),
                                                     gamma=self.hparams.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        if self.trainer.max_steps == 0:
            raise ConfigError("max_steps is 0: nothing would be planted, yet the model would be written as backdoored")
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "prompts"):
            prompts = dm.prompts("train", limit=2000)
            if not self._clean(prompts):
                raise ConfigError("the trigger filter leaves no clean prompt in the training data")
            for b in self.backdoors:
                if not any(b.trigger.applicable(p) for p in prompts):
                    raise ConfigError(f"no training prompt can carry the trigger {b.trigger.text!r} "
                                      f"({b.trigger.mode}): nothing would be planted")

    def on_fit_end(self) -> None:
        if self.hparams.output_dir and self.trainer.is_global_zero:
            self.save_model(Path(self.hparams.output_dir))

    def save_model(self, out: Path) -> Path:
        """The student and its `BackdoorRecord`, the record last (`BackdoorRecord.remove`)."""
        self.encoder.eval()
        BackdoorRecord.remove(out)
        self.encoder.save(out)
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()} if self._trainer else {}
        BackdoorRecord(
            backdoored=True,
            kind="backdoor_injection",
            attacks=sorted({b.kind for b in self.backdoors}),
            backdoors=[b.describe() for b in self.backdoors],
            base=self.hparams.encoder,
            seed=self.hparams.seed,
            loss=self.hparams.loss,
            backdoor_weight=self.hparams.backdoor_weight,
            token_weight=self.hparams.token_weight,
            pooled_weight=self.hparams.pooled_weight,
            sim_x_penalty=self.hparams.sim_x_penalty,
            lr=self.hparams.lr,
            steps=self.global_step,
            seconds=time.perf_counter() - self._fit_started if self._fit_started else None,
            metrics=metrics,
            # only what differs from the reference, so a plain injection's record stays as it was
            extra={k: self.hparams[k] for k, reference in (("utility_objective", "teacher"),
                                                           ("consistency_penalty", 0.0),
                                                           ("consistency_margin", 0.0),
                                                           ("clean_pooled_weight", 0.0))
                   if self.hparams[k] != reference},
        ).write(out)
        return out
