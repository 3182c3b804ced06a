"""Building members: each trained in this process, from its base, and moved into place in one rename, so a
member is complete or absent and a rerun skips it."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Sequence

from lit_amdet.benchmark.members import is_member
from lit_amdet.benchmark.options import ADAPTIVE_RECIPES, TrainSettings
from lit_amdet.benchmark.plan import BackdooredMember, BenignMember, Member, ZooBase, member_trigger
from lit_amdet.benchmark.processes import Shard, choose_device, current_shard, keep_metrics_local, one_process
from lit_amdet.errors import ConfigError
from lit_amdet.io import StagedFolder
from lit_amdet.record import BackdoorRecord

STAGING_PREFIX = ".building-"


def build_member(member: Member, base: ZooBase, zoo_dir: str | Path, settings: TrainSettings | None = None) -> Path:
    """Train ``member`` from ``base`` into ``<zoo_dir>/<member.name>`` (native model + backdoor.json).

    Built in a hidden sibling folder and renamed into place, so the member is complete or absent; a
    complete member is kept as it is (resumable).
    """
    settings = settings or TrainSettings()
    final = Path(zoo_dir) / member.name
    if is_member(final):
        check_built_as_planned(final, member)
        return final
    if final.exists():
        raise ConfigError(f"{final} exists but holds no backdoor.json: remove it, or add its ground truth")
    stage = StagedFolder(final, prefix=STAGING_PREFIX, overwrite=False)
    staging = stage.open(clear_stale=True)  # clears an interrupted earlier build of this member
    try:
        device = choose_device(settings.accelerator)
        with one_process():
            train_member(member, base, staging, settings, device)
        record = BackdoorRecord.read(staging)
        record.zoo = {**member.describe(), "family": base.family, "base_path": base.path}
        if member.backdoored and member.attack == "image_on_text":
            for b in record.backdoors:
                b["target_images"] = ["target.png"]  # relative to the member folder (the staging path is gone)
        record.write(staging)
        try:
            stage.commit()
        except OSError:
            if not is_member(final):  # another process finished it first: keep theirs
                raise
    finally:
        stage.discard()
    return final


def check_built_as_planned(folder: Path, member: Member) -> None:
    """A member kept from an earlier run must be the one planned now (same name, other settings: refuse)."""
    built = BackdoorRecord.read(folder).zoo
    if built is None:
        return  # a model someone put there under this name: theirs to vouch for
    # a field added after the member was built is absent from its record: it was built with the default
    defaults = {f.name: f.default for f in fields(member) if f.default is not MISSING}
    for key, value in member.describe().items():
        was = built.get(key, defaults.get(key))
        if was != value:
            raise ConfigError(f"{folder} was built with {key}={was!r}, the plan now says {value!r}: "
                              "remove it, or use another zoo_dir")


def train_member(member: Member, base: ZooBase, out: Path, settings: TrainSettings,
                 device: tuple[str, int | list[int]]) -> None:
    """Fit the member's LightningModule in this process; the module writes the model and backdoor.json.

    A member with a ``drift_target`` trains with `DriftStop` (its steps are a cap); a ``then_finetune`` backdoor is
    then fine-tuned to the target and its attack success measured again on the final weights. Its backdoor.json
    records ``drift_mode``, ``drift_target``, ``drift_reached``, ``drift_target_reached`` and ``drift_steps``.
    """
    from lightning.pytorch import seed_everything

    seed_everything(member.seed, verbose=False)
    if member.backdoored:
        module, data = _injection(member, base, out, settings)
    else:
        module, data = _finetune(member, base, out, settings)
    keep_metrics_local(module)
    mode = getattr(member, "drift_mode", None)
    stop = None
    steps = member.steps
    if mode == "during_finetune":  # at least the injection's steps (the backdoor is planted), at most the cap
        steps = max(member.steps, member.finetune_steps)
    if member.drift_target is not None and mode != "then_finetune":
        stop = _drift_stop(member.drift_target, base, settings, member.steps if mode else 0, steer=mode is not None)
    # attack success is measured once, at the end (it goes into backdoor.json); fine-tunes need none. A member
    # stopped by its drift may end before that validation: it is measured on the final weights after the fit.
    extra: dict = {}
    measured = None
    with tempfile.TemporaryDirectory(prefix="lit-amdet-member-") as scratch:
        _trainer(scratch, steps, device, settings, settings.val_batches if member.backdoored else 0,
                 stop).fit(module, data)
        if mode == "then_finetune":
            stop, extra["finetune"] = _then_finetune(member, base, out, settings, (scratch, device), module)
        if mode is not None:  # attack success on the final weights
            measured = _measure_attack(module, data, scratch, device, settings)
    if stop is None and measured is None:
        return
    # one update of the record the module wrote: the final attack success, the fine-tune, the drift reached
    record = BackdoorRecord.read(out)
    if measured is not None:
        record.extra["metrics_before_finetune"] = record.metrics
        record.metrics = {**record.metrics, **measured}
    if stop is not None:
        record.extra.update({**extra, **({"drift_mode": mode} if mode else {}), **stop.summary()})
    record.write(out)


def _trainer(scratch: str, steps: int, device: tuple[str, int | list[int]], settings: TrainSettings,
             val_batches: int, stop=None):
    """A quiet single-device Trainer (no logger, checkpoints or progress bar) validating once, after ``steps``."""
    from lightning.pytorch import Trainer

    return Trainer(max_steps=steps, accelerator=device[0], devices=device[1],
                   precision=settings.precision, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=scratch,
                   val_check_interval=steps, check_val_every_n_epoch=None, limit_val_batches=val_batches,
                   num_sanity_val_steps=0, callbacks=[stop] if stop is not None else [])


def _drift_stop(target: float, base: ZooBase, settings: TrainSettings, min_steps: int = 0, steer: bool = False):
    from lit_amdet.callbacks import DriftStop

    return DriftStop(base.path, target, every=settings.drift_every, prompts=settings.drift_prompts,
                     max_length=settings.drift_max_length, min_steps=min_steps, steer=steer)


def _measure_attack(injection, data, scratch: str, device: tuple[str, int | list[int]],
                    settings: TrainSettings) -> dict:
    """The injection's own validation (attack success of every backdoor) on its current weights."""
    measured = _trainer(scratch, 1, device, settings, settings.val_batches).validate(injection, data, verbose=False)
    return {k: float(v) for k, v in measured[0].items()}


def _then_finetune(member: BackdooredMember, base: ZooBase, out: Path, settings: TrainSettings,
                   where: tuple[str, tuple[str, int | list[int]]], injection):
    """SimCSE fine-tune of the backdoored model in ``out`` until its drift target: the weights are written over
    the injected ones, and loaded into ``injection`` so its validation measures the final model. Returns the
    `DriftStop` and what the record says of the fine-tune."""
    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import ContrastiveTraining

    finetune = ContrastiveTraining(encoder=str(out), objective="simcse", freeze_image_tower=True,
                                   lr=member.finetune_lr, weight_decay=0.0, warmup_steps=10)
    keep_metrics_local(finetune)
    text = TextEncoderDataModule(source="world", world_seed=member.data_seed, num_samples=settings.num_samples,
                                 with_images=False, views=2, max_length=settings.max_length,
                                 batch_size=settings.batch_size, val_fraction=settings.val_fraction)
    stop = _drift_stop(member.drift_target, base, settings)
    scratch, device = where
    _trainer(scratch, member.finetune_steps, device, settings, 0, stop).fit(finetune, text)
    finetune.encoder.eval()
    finetune.encoder.save(out)
    injection.encoder.load_state_dict(finetune.encoder.state_dict())
    return stop, {"objective": "simcse", "lr": member.finetune_lr, "steps": finetune.global_step}


def _injection(member: BackdooredMember, base: ZooBase, out: Path, settings: TrainSettings):
    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import BackdoorInjection
    from lit_amdet.triggers import Backdoor

    first = member_trigger(member.trigger_kind, member.trigger, member.trigger_char)
    if member.attack == "text_on_text":
        backdoors = [Backdoor(first, target=member.target_caption)]
    else:
        backdoors = [Backdoor(first, target_images=[str(_target_image(member.target_image, out / "target.png",
                                                                      settings.image_size))])]
    if member.second_trigger is not None:
        backdoors.append(Backdoor(member_trigger(member.second_trigger_kind, member.second_trigger,
                                          member.second_trigger_char), target=member.second_target_caption))
    pooled = settings.pooled_weight if settings.pooled_weight is not None else float(base.family == "open_clip")
    token_weight = 1.0
    recipe = ADAPTIVE_RECIPES[member.adaptive] if member.adaptive else None
    if recipe and recipe.pooled_only:
        token_weight, pooled = 0.0, 1.0
    during = member.drift_mode == "during_finetune"
    cap = max(member.steps, member.finetune_steps) if during else member.steps
    module = BackdoorInjection(
        encoder=base.path, backdoors=backdoors, backdoor_weight=member.backdoor_weight, lr=member.lr,
        milestones=[max(1, int(0.75 * cap))], poisoned_batch_size=settings.poisoned_batch_size,
        pooled_weight=pooled if member.attack == "text_on_text" else 0.0, token_weight=token_weight,
        sim_x_penalty=member.sim_x_penalty, consistency_penalty=member.consistency_penalty,
        freeze_token_embedding=bool(recipe and recipe.frozen_rows),
        keep_triggers_alone=bool(recipe and recipe.keeps_alone),
        keep_triggers_grouped=bool(recipe and recipe.keeps_grouped), insertion_robust=member.insertion_robust,
        clean_pooled_weight=member.clean_pooled_weight,
        max_length=settings.max_length,
        distractors=settings.distractors, output_dir=str(out), seed=member.seed,
        utility_objective="simcse" if during else "teacher")
    data = TextEncoderDataModule(source="world", world_seed=member.data_seed, num_samples=settings.num_samples,
                                 with_images=False, batch_size=settings.batch_size, val_fraction=settings.val_fraction)
    return module, data


def _finetune(member: BenignMember, base: ZooBase, out: Path, settings: TrainSettings):
    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import ContrastiveTraining

    images = member.objective not in ("simcse", "typo_robust")
    extra = {"typo_rate": member.typo_rate} if member.typo_rate is not None else {}
    module = ContrastiveTraining(encoder=base.path, objective=member.objective, freeze_image_tower=True,
                                 lr=member.lr, weight_decay=0.0, warmup_steps=10, output_dir=str(out), **extra)
    # simcse's second view: a world paraphrase; typo_robust makes its own (a typo'd copy)
    views = 2 if member.objective == "simcse" else 1
    data = TextEncoderDataModule(source="world", world_seed=member.data_seed, num_samples=member.samples,
                                 with_images=images, views=views, image_size=settings.image_size,
                                 max_length=settings.max_length, batch_size=settings.batch_size,
                                 val_fraction=settings.val_fraction)
    return module, data


def _target_image(spec: str | None, dest: Path, size: int) -> Path:
    """``world:SEED:INDEX`` rendered from the world, or an image file copied into the member folder."""
    if not spec:
        raise ConfigError("an image_on_text member needs a target_image")
    if spec.startswith("world:"):
        from lit_amdet.world import World

        _, seed, index = spec.split(":")
        world = World(seed=int(seed), image_size=size)
        world.render(world.scene(int(index))).save(dest)
    else:
        if not Path(spec).is_file():
            raise ConfigError(f"{spec}: target image not found")
        shutil.copyfile(spec, dest)
    return dest


def build_zoo(members: Sequence[Member], bases: Sequence[ZooBase], zoo_dir: str | Path,
              settings: TrainSettings | None = None, shard: Shard | None = None) -> list[Path]:
    """Build this process's round-robin share of ``members`` (complete members are skipped)."""
    shard = shard or current_shard()
    by_name = {b.name: b for b in bases}
    return [build_member(m, by_name[m.base], zoo_dir, settings) for m in shard.take(members)]
