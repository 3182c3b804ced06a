"""`DriftStop`: train until the model has drifted to a chosen clean cosine to its base, then stop.

The benchmark's drift sweep needs members at chosen drift levels (benign fine-tunes and backdoors hidden under a
fine-tune), and a step count does not give a drift: how far a step moves a model depends on the base, the lr and
the data. So the drift itself is measured during training, the way the benchmark measures it for every scanned
member (`pooled_drift`, which `lit_amdet.benchmark.scan.clean_cosine_to_base` uses too).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

#: the world seed of the held-out prompts drift is measured on, here and by the benchmark (no member trains on it)
DRIFT_WORLD_SEED = 31337


@torch.no_grad()
def pooled_drift(reference, encoder, prompts: Sequence[str], max_length: int | None = 32,
                 batch_size: int = 64) -> float:
    """Mean cosine of the clean pooled embeddings of ``prompts``, ``encoder`` vs ``reference`` (1 = unmoved).

    Both adapters are run in eval mode (no dropout) and put back in the mode they were in.
    """
    modes = reference.training, encoder.training
    reference.eval(), encoder.eval()
    try:
        total = 0.0
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            a = F.normalize(reference.encode(chunk, max_length=max_length).pooled.float(), dim=-1)
            b = F.normalize(encoder.encode(chunk, max_length=max_length).pooled.float(), dim=-1)
            total += float((a * b.to(a.device)).sum())
    finally:
        reference.train(modes[0]), encoder.train(modes[1])
    return total / len(prompts)


class DriftStop(Callback):
    """Stop training once the trained encoder's drift to ``reference`` is at most ``target``.

    Every ``every`` steps (and once before the first) the LightningModule's ``.encoder`` is compared with the
    reference (the base, loaded once with `lit_amdet.encoders.load_encoder`) on ``prompts`` held-out world
    captions (``World(seed=world_seed)``); at or below ``target`` it sets ``trainer.should_stop``. A model that is
    already there trains no step. After fit, ``reached`` is the last measured drift (measured again at the end of
    training, so it is the final model's) and ``target_reached`` whether it got to the target; ``history`` holds
    (step, drift) of every measurement.

    Args:
        reference: the base checkpoint (folder or built-in name).
        target: the clean cosine to stop at (0 < target <= 1).
        every: steps between measurements.
        prompts: held-out prompts per measurement.
        max_length: token positions per prompt.
        world_seed: the world the prompts come from.
        min_steps: never stop before this many steps (a backdoor planted during the fine-tune needs them).
        steer: hold the drift at the target until ``min_steps``: at each measurement before them the module's
            ``drift_hold`` is set to whether the target is reached (`BackdoorInjection` then swaps its drifting
            SimCSE utility for the teacher's until the drift is above the target again). Without it a model
            that drifts fast runs far past the target before ``min_steps`` (the first drift sweep's backdoors
            planted during a fine-tune stopped at 0.45 to 0.62 whatever their target).
    """

    def __init__(self, reference: str, target: float, every: int = 10, prompts: int = 200,
                 max_length: int | None = 32, world_seed: int = DRIFT_WORLD_SEED, min_steps: int = 0,
                 steer: bool = False) -> None:
        from lit_amdet.errors import ConfigError

        if not 0 < target <= 1:
            raise ConfigError(f"DriftStop: target is a clean cosine in (0, 1], got {target}")
        if every < 1 or prompts < 1:
            raise ConfigError("DriftStop: every and prompts must be at least 1")
        self.reference_path, self.target, self.every = str(reference), float(target), int(every)
        self.n_prompts, self.max_length, self.world_seed = int(prompts), max_length, int(world_seed)
        self.min_steps, self.steer = int(min_steps), bool(steer)
        self.reference = None
        self.prompts: list[str] = []
        self.reached: float | None = None
        self.target_reached = False
        self.history: list[tuple[int, float]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.steer and not hasattr(pl_module, "drift_hold"):
            from lit_amdet.errors import ConfigError

            raise ConfigError(f"DriftStop(steer=True): {type(pl_module).__name__} has no drift_hold to steer")
        if self.reference is None:
            from lit_amdet.encoders import load_encoder
            from lit_amdet.world import World

            self.reference = load_encoder(self.reference_path).eval().requires_grad_(False)
            self.prompts = World(seed=self.world_seed).captions(self.n_prompts)

    def measure(self, pl_module: LightningModule, step: int) -> float:
        """The drift now; records it and whether the target is reached."""
        self.reference.to(pl_module.device)
        self.reached = pooled_drift(self.reference, pl_module.encoder, self.prompts, self.max_length)
        self.target_reached = self.reached <= self.target
        self.history.append((step, self.reached))
        if self.steer:  # hold only while stopping is not allowed yet; from min_steps on, drift to the target
            pl_module.drift_hold = self.target_reached and step < self.min_steps
        return self.reached

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.measure(pl_module, trainer.global_step) <= self.target and self.min_steps <= 0:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (not self.history or self.history[-1][0] != step):
            if self.measure(pl_module, step) <= self.target and step >= self.min_steps:
                trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history or self.history[-1][0] != trainer.global_step:
            self.measure(pl_module, trainer.global_step)
        if self.steer:  # a fit that ended before min_steps must not leave the module held
            pl_module.drift_hold = False

    def summary(self) -> dict:
        """What a record keeps: target, drift reached, whether it got there, the step it stopped at, and
        ``drift_steered`` when the drift was held (`steer`)."""
        return {"drift_target": self.target, "drift_reached": self.reached, "drift_target_reached":
                self.target_reached, "drift_steps": self.history[-1][0] if self.history else None,
                **({"drift_steered": True} if self.steer else {})}
