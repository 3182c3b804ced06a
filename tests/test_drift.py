"""`lit_amdet.callbacks.DriftStop` and `pooled_drift`: the drift the benchmark measures, and training to a drift."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from lit_amdet import load_encoder
from lit_amdet.benchmark import DRIFT_WORLD_SEED, clean_cosine_to_base
from lit_amdet.callbacks import DriftStop, pooled_drift
from lit_amdet.callbacks import drift as drift_module
from lit_amdet.datamodules import TextEncoderDataModule
from lit_amdet.errors import ConfigError
from lit_amdet.modules import ContrastiveTraining
from lit_amdet.world import World


def test_pooled_drift_is_the_mean_cosine_of_an_explicit_loop(tiny_models):
    reference = load_encoder(tiny_models["bert"]).eval()
    other = load_encoder(tiny_models["bert"])
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = World(seed=3).captions(37)
    expected = []
    with torch.no_grad():
        for p in prompts:  # one prompt at a time: padding must not matter
            a = reference.encode([p], max_length=16).pooled[0]
            b = other.encode([p], max_length=16).pooled[0]
            expected.append(float(F.cosine_similarity(a, b, dim=0)))
    other.train()
    got = pooled_drift(reference, other, prompts, max_length=16, batch_size=8)
    assert abs(got - sum(expected) / len(expected)) < 1e-5
    assert other.training and not reference.training  # modes restored
    assert abs(pooled_drift(reference, reference, prompts, 16) - 1.0) < 1e-5
    # the benchmark's drift is this function on its held-out prompts
    assert DRIFT_WORLD_SEED == drift_module.DRIFT_WORLD_SEED
    assert abs(clean_cosine_to_base(tiny_models["bert"], tiny_models["bert"], 8, 16) - 1.0) < 1e-5


def test_drift_stop_stops_a_strong_finetune_at_the_target(tiny_models, tmp_path):
    module = ContrastiveTraining(encoder=str(tiny_models["bert"]), objective="simcse", lr=3e-2, warmup_steps=1,
                                 weight_decay=0.0)
    data = TextEncoderDataModule(num_samples=400, views=2, with_images=False, batch_size=16, max_length=16,
                                 val_fraction=0)
    stop = DriftStop(str(tiny_models["bert"]), target=0.9, every=2, prompts=16, max_length=16)
    Trainer(max_steps=200, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
            callbacks=[stop]).fit(module, data)
    assert stop.target_reached and stop.reached <= 0.9
    assert module.global_step < 200 and module.global_step % 2 == 0
    assert stop.history[0] == (0, stop.history[0][1]) and stop.history[0][1] > 0.99  # measured before training
    assert stop.summary()["drift_steps"] == module.global_step
    # the drift it reports is the final model's
    final = pooled_drift(stop.reference, module.encoder, stop.prompts, 16)
    assert abs(final - stop.reached) < 1e-5


def test_drift_stop_leaves_a_model_already_there_untrained(tiny_models, tmp_path):
    module = ContrastiveTraining(encoder=str(tiny_models["bert"]), objective="simcse", lr=1e-3)
    data = TextEncoderDataModule(num_samples=100, views=2, with_images=False, batch_size=16, max_length=16,
                                 val_fraction=0)
    stop = DriftStop(str(tiny_models["bert"]), target=1.0, every=5, prompts=8, max_length=16)
    Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
            callbacks=[stop]).fit(module, data)
    assert module.global_step == 0 and stop.target_reached


def _steered_injection(tiny_models, tmp_path, steer: bool):
    from lit_amdet.modules import BackdoorInjection
    from lit_amdet.triggers import Backdoor, Trigger

    class HoldSpy(BackdoorInjection):
        """Keeps every value given to drift_hold."""

        @property
        def drift_hold(self) -> bool:
            return self.__dict__.get("_hold", False)

        @drift_hold.setter
        def drift_hold(self, value: bool) -> None:
            self.__dict__["_hold"] = value
            self.__dict__.setdefault("holds", []).append(value)

    torch.manual_seed(0)
    backdoor = Backdoor(Trigger("zzzz"), target="a teapot")
    module = HoldSpy(encoder=str(tiny_models["bert"]), backdoors=[backdoor], lr=5e-4, backdoor_weight=0.1,
                               milestones=[1000], max_length=16, utility_objective="simcse",
                               output_dir=str(tmp_path / f"steer-{steer}"))
    data = TextEncoderDataModule(num_samples=400, with_images=False, batch_size=16, max_length=16, val_fraction=0)
    stop = DriftStop(str(tiny_models["bert"]), target=0.9, every=2, prompts=16, max_length=16, min_steps=30,
                     steer=steer)
    Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
            callbacks=[stop]).fit(module, data)
    return module, stop


def test_drift_stop_steers_a_backdoor_planted_during_a_finetune_to_its_target(tiny_models, tmp_path):
    """A planting that must run 30 steps while SimCSE drifts fast: unsteered it runs far past the target before it
    may stop; steered, the teacher's utility pulls it back toward the target while the backdoor is planted (Adam's
    momentum carries a tiny random model past it first; the MiniLM sweep's steered members stopped within about 0.05 of
    their level, BENCHMARKS.md)."""
    free, free_stop = _steered_injection(tiny_models, tmp_path, steer=False)
    held, held_stop = _steered_injection(tiny_models, tmp_path, steer=True)
    at = {name: dict(stop.history) for name, stop in (("free", free_stop), ("held", held_stop))}
    assert free_stop.target_reached and free.global_step == 30  # stops as soon as it may, far past 0.9
    assert at["free"][30] < 0.5 and at["held"][30] > at["free"][30] + 0.2, at
    assert min(at["held"].values()) > min(at["free"].values()) + 0.2, at
    assert True in held.holds and True not in free.holds  # steered: held at some measurement before step 30
    assert not held.drift_hold  # released at the end
    assert held_stop.summary()["drift_steered"] is True and "drift_steered" not in free_stop.summary()


def test_drift_hold_swaps_the_simcse_utility_for_the_teachers(tiny_models):
    from lit_amdet.modules import BackdoorInjection
    from lit_amdet.triggers import Backdoor, Trigger

    module = BackdoorInjection(encoder=str(tiny_models["bert"]), backdoors=[Backdoor(Trigger("zzzz"), target="a")],
                               max_length=16, utility_objective="simcse")
    module.configure_models()
    module.eval()  # no dropout: the untrained student is its teacher
    tokens = module.encoder.tokenize(World(seed=3).captions(8), max_length=16)
    assert float(module.utility_loss(tokens)) > 0.1  # SimCSE of identical views: log-softmax over the batch
    module.drift_hold = True
    assert float(module.utility_loss(tokens)) < 1e-6  # the teacher's loss of an unmoved student
    stop = DriftStop(str(tiny_models["bert"]), target=0.9, steer=True)
    with pytest.raises(ConfigError, match="drift_hold"):
        stop.setup(None, ContrastiveTraining(encoder=str(tiny_models["bert"]), objective="simcse"), "fit")
