"""`ContrastiveTraining`: pretrain a CLIP-family model from scratch, or fine-tune one benignly.

Objectives: CLIP InfoNCE with a learnable temperature (``infonce``), SigLIP's
sigmoid loss with learnable scale and bias (``sigmoid``), and, when no images
are given, a text-only SimCSE-style InfoNCE between two views of a caption
(``simcse``: world paraphrases when the data has them, else word dropout), and
``typo_robust``: SimCSE whose second view is a typo'd copy of the caption
(`lit_amdet.augment.typo`), a benign many-to-one mapping that looks trigger-like.
With ``freeze_image_tower`` this is the benign fine-tune the detection
benchmark needs; the result is written in the family's native format, with a
``backdoor.json`` that says it has none.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lit_amdet.augment import typo
from lit_amdet.encoders.architectures import EncoderSpec
from lit_amdet.errors import ConfigError
from lit_amdet.io import check_writable_folder, write_json
from lit_amdet.losses import clip_infonce, siglip_sigmoid
from lit_amdet.metrics import recall_at_k
from lit_amdet.modules.base import EncoderTask
from lit_amdet.record import TRAINING_INFO, BackdoorRecord

#: objectives that never run the image tower (the positive is a second text view)
TEXT_ONLY_OBJECTIVES = ("simcse", "typo_robust")


def simcse_loss(text: Tensor, other: Tensor, temperature: float = 0.05) -> Tensor:
    """SimCSE: in-batch InfoNCE between two views of the same texts at a fixed temperature (here and in
    `BackdoorInjection`'s ``simcse`` utility, which must drift the model exactly as a benign SimCSE does)."""
    return clip_infonce(text, other, torch.tensor(math.log(1 / temperature)))


def word_dropout(text: str, p: float, rng: random.Random) -> str:
    words = text.split()
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept or words[:1])


class ContrastiveTraining(EncoderTask):
    """Image-text (or text-text) contrastive training of an encoder.

    Args:
        encoder: checkpoint to fine-tune (folder or built-in name); or
        architecture: a new model to pretrain from scratch.
        objective: ``infonce`` | ``sigmoid`` | ``simcse`` | ``typo_robust``.
        freeze_image_tower: train the text tower only (benign fine-tuning).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 0.1·lr.
        init_temperature: CLIP temperature at start (learnable); SigLIP starts at t=10, b=-10.
        simcse_temperature: fixed temperature of the text-only objective.
        word_dropout: second-view word dropout when no paraphrases exist.
        typo_rate: ``typo_robust``: share of a caption's letters its second view edits (at least one).
        eval_candidates: recall is measured among this many candidates.
        output_dir: where the trained model is written at the end of fit.
    """

    def __init__(
        self,
        encoder: str | None = None,
        architecture: EncoderSpec | None = None,
        objective: Literal["infonce", "sigmoid", "simcse", "typo_robust"] = "infonce",
        freeze_image_tower: bool = False,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        init_temperature: float = 0.07,
        simcse_temperature: float = 0.05,
        word_dropout: float = 0.15,
        typo_rate: float = 0.1,
        eval_candidates: int = 100,
        output_dir: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self._architecture = architecture
        self._val_outputs: list[tuple[Tensor, Tensor]] = []
        self._fit_started = 0.0
        super().__init__(ignore=["architecture"])

    # ----- hooks -----------------------------------------------------------------
    def configure_models(self) -> None:
        hp, architecture = self.hparams, self._architecture
        if hp.lr <= 0:
            raise ConfigError(f"lr must be > 0, not {hp.lr}")
        check_writable_folder(hp.output_dir)
        self.hparams["architecture"] = architecture.as_dict() if architecture is not None else None
        self.encoder = self.open_encoder(hp.encoder, architecture, hp.allow_pickle)
        self.encoder.train()
        text_only = hp.objective in TEXT_ONLY_OBJECTIVES
        if not text_only and not self.encoder.has_image_tower:
            raise ConfigError(f"objective {hp.objective!r} needs an image tower; "
                              f"{self.encoder.name} has none (use objective: simcse)")
        # the text-only objective never runs the image tower: freeze it too
        if (hp.freeze_image_tower or text_only) and self.encoder.has_image_tower:
            image = set(self.encoder.image_parameter_names())
            for name, p in self.encoder.model.named_parameters():
                if name in image:
                    p.requires_grad_(False)
        # Learnable temperature (and SigLIP bias): from the checkpoint when fine-tuning, else the papers' inits.
        model = self.encoder.model
        native_scale, native_bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
        fine_tune = architecture is None
        if hp.objective == "sigmoid":
            scale, bias = math.log(10.0), -10.0
            if fine_tune and native_scale is not None and native_bias is not None:
                scale, bias = float(native_scale.flatten()[0]), float(native_bias.flatten()[0])
            self.logit_bias = nn.Parameter(torch.tensor(bias))
        else:
            scale = math.log(1 / hp.init_temperature)
            if fine_tune and native_scale is not None:
                scale = float(native_scale.flatten()[0])
            self.logit_bias = None
        self.logit_scale = nn.Parameter(torch.tensor(scale), requires_grad=not text_only)

    # ----- steps -----------------------------------------------------------------
    def embed_pair(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Pooled text embeddings and their positives: the images, or a second text view (SimCSE; typo'd copies
        for ``typo_robust``)."""
        text = self.encoder.encode(batch["tokens"]).pooled
        if self.hparams.objective == "typo_robust":
            rng = random.Random(int(batch["index"][0]) + 7919 * self.global_step)
            typos = [typo(t, self.hparams.typo_rate, rng) for t in batch["text"]]
            other = self.encoder.tokenize(typos, max_length=batch["tokens"].input_ids.shape[1]).to(self.device)
            return text, self.encoder.encode(other).pooled
        if self.hparams.objective == "simcse":
            if batch.get("view_tokens"):
                other = batch["view_tokens"][0]
            else:
                rng = random.Random(int(batch["index"][0]) + 7919 * self.global_step)
                aug = [word_dropout(t, self.hparams.word_dropout, rng) for t in batch["text"]]
                other = self.encoder.tokenize(aug, max_length=batch["tokens"].input_ids.shape[1]).to(self.device)
            return text, self.encoder.encode(other).pooled
        if "pixel_values" not in batch:
            raise ConfigError("the data has no images; use objective: simcse or a source with images")
        return text, self.encoder.encode_image(batch["pixel_values"])

    def pair_loss(self, text: Tensor, other: Tensor) -> Tensor:
        """The objective's loss over a batch of (text, positive) embedding pairs."""
        objective = self.hparams.objective
        if objective == "sigmoid":
            return siglip_sigmoid(text, other, self.logit_scale, self.logit_bias)
        if objective in TEXT_ONLY_OBJECTIVES:
            return simcse_loss(text, other, self.hparams.simcse_temperature)
        return clip_infonce(text, other, self.logit_scale)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        text, other = self.embed_pair(batch)
        loss = self.pair_loss(text, other)
        bs = text.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/temperature", 1.0 / self.logit_scale.exp(), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # CLIP clamps the logit scale at 100
            self.logit_scale.clamp_(max=math.log(100.0))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        text, other = self.embed_pair(batch)
        self.log("val/loss", self.pair_loss(text, other), batch_size=text.shape[0], sync_dist=True)
        self._val_outputs.append((text.detach().float().cpu(), other.detach().float().cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        text = torch.cat([t for t, _ in self._val_outputs])
        other = torch.cat([o for _, o in self._val_outputs])
        self._val_outputs.clear()
        block = min(self.hparams.eval_candidates, text.shape[0])
        text_only = self.hparams.objective in TEXT_ONLY_OBJECTIVES
        what, back = ("t2t", "t2t_rev") if text_only else ("t2i", "i2t")
        for name, (q, k) in {what: (text, other), back: (other, text)}.items():
            for kk, r in recall_at_k(q, k, ks=(1, 5), block=block).items():
                self.log(f"val/{name}_R@{kk}", r, sync_dist=True)

    # ----- optimisation ----------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1000
        warm = min(self.hparams.warmup_steps, max(1, int(total) // 10))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- output ----------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def on_fit_end(self) -> None:
        if not self.hparams.output_dir or not self.trainer.is_global_zero:
            return
        self.save_model(Path(self.hparams.output_dir))

    def save_model(self, out: Path) -> Path:
        """Write the model natively, with the learned temperature copied back into it."""
        model = self.encoder.model
        with torch.no_grad():
            learned = self.hparams.objective not in TEXT_ONLY_OBJECTIVES
            if getattr(model, "logit_scale", None) is not None and learned:
                model.logit_scale.copy_(self.logit_scale.detach().view_as(model.logit_scale))
            if self.logit_bias is not None and getattr(model, "logit_bias", None) is not None:
                model.logit_bias.copy_(self.logit_bias.detach().view_as(model.logit_bias))
        self.encoder.eval()
        BackdoorRecord.remove(out)  # the records are written last (a base counts as built by training.json)
        (out / TRAINING_INFO).unlink(missing_ok=True)
        self.encoder.save(out)
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()} if self._trainer else {}
        info = {
            "objective": self.hparams.objective,
            "base": self.hparams.encoder,
            "architecture": self.hparams.architecture,
            "freeze_image_tower": self.hparams.freeze_image_tower,
            "steps": self.global_step,
            "seconds": time.perf_counter() - self._fit_started if self._fit_started else None,
            "metrics": metrics,
        }
        if self.hparams.encoder is not None:  # a fine-tune of an existing model: ground truth for the benchmark
            BackdoorRecord(backdoored=False, kind="benign_finetune", base=self.hparams.encoder,
                           objective=self.hparams.objective, lr=self.hparams.lr, steps=self.global_step).write(out)
        write_json(out / TRAINING_INFO, info)
        return out
