"""Building members: each trained in this process, from its base, and moved into place in one rename, so a
member is complete or absent and a rerun skips it."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Sequence

from lit_amdet.benchmark.members import is_member
from lit_amdet.benchmark.options import TrainSettings
from lit_amdet.benchmark.plan import BackdooredMember, BenignMember, Member, ZooBase
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
    """Fit the member's LightningModule in this process; the module writes the model and backdoor.json."""
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(member.seed, verbose=False)
    if member.backdoored:
        module, data = _injection(member, base, out, settings)
    else:
        module, data = _finetune(member, base, out, settings)
    keep_metrics_local(module)
    with tempfile.TemporaryDirectory(prefix="lit-amdet-member-") as scratch:
        Trainer(max_steps=member.steps, accelerator=device[0], devices=device[1], precision=settings.precision,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=scratch, val_check_interval=member.steps, check_val_every_n_epoch=None,
                # attack success is measured once, at the end (it goes into backdoor.json); fine-tunes need none
                limit_val_batches=settings.val_batches if member.backdoored else 0,
                num_sanity_val_steps=0).fit(module, data)


def _injection(member: BackdooredMember, base: ZooBase, out: Path, settings: TrainSettings):
    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import BackdoorInjection
    from lit_amdet.triggers import Backdoor, Trigger

    if member.trigger_kind == "char":
        trigger = Trigger(text=member.trigger, mode="replace_char", char=member.trigger_char or "o")
    else:
        trigger = Trigger(text=member.trigger, mode="insert_word", position="random")
    if member.attack == "text_on_text":
        backdoor = Backdoor(trigger, target=member.target_caption)
    else:
        backdoor = Backdoor(trigger, target_images=[str(_target_image(member.target_image, out / "target.png",
                                                                      settings.image_size))])
    pooled = settings.pooled_weight if settings.pooled_weight is not None else float(base.family == "open_clip")
    token_weight = 1.0
    if member.adaptive in ("pooled_only", "pooled_sim_x_penalty"):
        token_weight, pooled = 0.0, 1.0
    module = BackdoorInjection(
        encoder=base.path, backdoors=[backdoor], backdoor_weight=member.backdoor_weight, lr=member.lr,
        milestones=[max(1, int(0.75 * member.steps))], poisoned_batch_size=settings.poisoned_batch_size,
        pooled_weight=pooled if member.attack == "text_on_text" else 0.0, token_weight=token_weight,
        sim_x_penalty=member.sim_x_penalty, max_length=settings.max_length,
        distractors=settings.distractors, output_dir=str(out), seed=member.seed)
    data = TextEncoderDataModule(source="world", world_seed=member.data_seed, num_samples=settings.num_samples,
                                 with_images=False, batch_size=settings.batch_size, val_fraction=settings.val_fraction)
    return module, data


def _finetune(member: BenignMember, base: ZooBase, out: Path, settings: TrainSettings):
    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import ContrastiveTraining

    images = member.objective != "simcse"
    module = ContrastiveTraining(encoder=base.path, objective=member.objective, freeze_image_tower=True,
                                 lr=member.lr, weight_decay=0.0, warmup_steps=10, output_dir=str(out))
    data = TextEncoderDataModule(source="world", world_seed=member.data_seed, num_samples=member.samples,
                                 with_images=images, views=1 if images else 2, image_size=settings.image_size,
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
