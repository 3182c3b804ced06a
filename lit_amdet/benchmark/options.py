"""What ``lit-amdet benchmark`` takes, as typed dataclasses.

The same classes are the subcommand's signature (`lit_amdet.cli.AmdetTrainer.benchmark`), so jsonargparse
rejects unknown keys and wrong types before anything runs; `parse_options` reads a config file's values with
them outside the CLI (``benchmarks/summarise_scanned.py``). Value constraints are types (``Literal``,
``PositiveInt``, ...); the few checks across fields are ``__post_init__`` raising `ConfigError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, get_args

from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from lit_amdet.errors import ConfigError
from lit_amdet.io import check_writable_folder, read_yaml

Split = Literal["calibration", "test"]
Attack = Literal["text_on_text", "image_on_text"]
# attacks built to evade assimilation (text-on-text, test split only, reported apart from the detection table):
# pooled_only matches only the sentence embedding; sim_x_penalty matches the token features but pays for every
# bit of Sim_X above the clean model's on triggered prompts; pooled_sim_x_penalty does both;
# pooled_consistency_penalty (aimed at CollapseContrastRule's pooled path) is pooled_sim_x_penalty that also pays
# for triggered sentence embeddings agreeing more than the clean model's do; frozen_rows_pooled_sim_x_penalty (aimed
# at the typed-token probe) is pooled_sim_x_penalty with the token embedding table frozen, so no row moves;
# alone_kept_frozen_rows (aimed at the probe's typed-alone list) also holds each trigger token typed alone at the
# clean model's output, so the trigger fires only in context; null_evading (aimed at the token path's null) plants
# a token-feature backdoor during a SimCSE drift to adaptive.null_evading_drift while learning to ignore inserted
# tokens, with alone_kept_frozen_rows' table and typed-alone terms so the probe does not decide before the search;
# group_kept_frozen_rows (aimed at the alone list made by group testing near the anchor) is alone_kept_frozen_rows
# that also holds each trigger token typed among random tokens, in the scan's own row and in random ones;
# agreeing_target (aimed at the typed path's shift agreement) is pooled_consistency_penalty whose target is the
# world caption the base already moves triggered prompts towards most (`lit_amdet.benchmark.aimed`);
# pooled_only_kept_near (aimed at the drift boundary, below which an unflagged model is inconclusive) is pooled_only
# that also holds the clean prompts' sentence embeddings at the base's, so the suspect stays near its anchor;
# pooled_sim_x_penalty_kept_near and pooled_consistency_penalty_kept_near do the same for those two attacks
AdaptiveAttack = Literal["pooled_only", "sim_x_penalty", "pooled_sim_x_penalty", "pooled_consistency_penalty",
                         "frozen_rows_pooled_sim_x_penalty", "alone_kept_frozen_rows", "null_evading",
                         "group_kept_frozen_rows", "agreeing_target", "pooled_only_kept_near",
                         "pooled_sim_x_penalty_kept_near", "pooled_consistency_penalty_kept_near"]
# homoglyph (a Latin letter replaced by a look-alike of another script) came later: the grid's default stays the
# first four, so configs that name no trigger kinds keep their plans
TriggerKind = Literal["char", "word", "rare_token", "multi_token", "homoglyph"]
# the drift sweep: how a benign member drifts (auto: infonce where the base has an image tower, else simcse) and
# how a backdoor hides under drift (planted, then fine-tuned; or planted during the fine-tune)
DriftObjective = Literal["auto", "simcse", "infonce", "typo_robust"]
DriftMode = Literal["then_finetune", "during_finetune"]
Family = Literal["clip", "longclip", "siglip", "open_clip", "bert"]

SPLITS: tuple[str, ...] = get_args(Split)
ATTACKS: tuple[str, ...] = get_args(Attack)
ADAPTIVE_ATTACKS: tuple[str, ...] = get_args(AdaptiveAttack)


@dataclass(frozen=True)
class AdaptiveRecipe:
    """How an adaptive attack trains: ``pooled_only`` matches only the sentence embedding (no token features);
    ``pays_sim_x`` adds `AdaptiveSettings.sim_x_penalty`, ``pays_consistency`` its ``consistency_penalty``;
    ``frozen_rows`` keeps the token embedding table as the base's; ``agrees`` picks the target the base already
    moves triggered prompts towards (`lit_amdet.benchmark.aimed.agreeing_target`); ``keeps_alone`` holds each
    trigger token typed alone at the base's output (`BackdoorInjection.keep_triggers_alone`), ``keeps_grouped``
    typed among random tokens (`BackdoorInjection.keep_triggers_grouped`); ``evades_null`` plants the backdoor
    during the drift to ``adaptive.null_evading_drift`` (the sweep's ``during_finetune``) with
    `BackdoorInjection.insertion_robust` at ``adaptive.insertion_weight``, so the model ignores inserted tokens
    and does not share the clean model's natural collapses, which raises the token path's null. ``keeps_near``
    also matches the clean prompts' sentence embeddings to the base's (`BackdoorInjection.clean_pooled_weight`
    at `AdaptiveSettings.clean_pooled_weight`), so a pooled-only backdoor does not drag the suspect below the
    scan's drift boundary."""

    pooled_only: bool
    pays_sim_x: bool
    pays_consistency: bool
    frozen_rows: bool = False
    keeps_alone: bool = False
    evades_null: bool = False
    keeps_grouped: bool = False
    agrees: bool = False
    keeps_near: bool = False


#: the one place an adaptive attack's name is read (the planner sets the penalties, the builder the matching)
ADAPTIVE_RECIPES: dict[str, AdaptiveRecipe] = {
    "pooled_only": AdaptiveRecipe(pooled_only=True, pays_sim_x=False, pays_consistency=False),
    "sim_x_penalty": AdaptiveRecipe(pooled_only=False, pays_sim_x=True, pays_consistency=False),
    "pooled_sim_x_penalty": AdaptiveRecipe(pooled_only=True, pays_sim_x=True, pays_consistency=False),
    "pooled_consistency_penalty": AdaptiveRecipe(pooled_only=True, pays_sim_x=True, pays_consistency=True),
    "frozen_rows_pooled_sim_x_penalty": AdaptiveRecipe(pooled_only=True, pays_sim_x=True, pays_consistency=False,
                                                       frozen_rows=True),
    "alone_kept_frozen_rows": AdaptiveRecipe(pooled_only=True, pays_sim_x=True, pays_consistency=False,
                                             frozen_rows=True, keeps_alone=True),
    "null_evading": AdaptiveRecipe(pooled_only=False, pays_sim_x=False, pays_consistency=False, frozen_rows=True,
                                   keeps_alone=True, evades_null=True),
    "group_kept_frozen_rows": AdaptiveRecipe(pooled_only=True, pays_sim_x=True, pays_consistency=False,
                                             frozen_rows=True, keeps_alone=True, keeps_grouped=True),
    "agreeing_target": AdaptiveRecipe(pooled_only=True, pays_sim_x=True, pays_consistency=True, agrees=True),
}
# the attackers aimed at the drift boundary: each of these three with the clean sentence embeddings held
ADAPTIVE_RECIPES.update({f"{name}_kept_near": replace(ADAPTIVE_RECIPES[name], keeps_near=True)
                         for name in ("pooled_only", "pooled_sim_x_penalty", "pooled_consistency_penalty")})
ALL_TRIGGER_KINDS: tuple[str, ...] = get_args(TriggerKind)
TRIGGER_KINDS: tuple[str, ...] = ALL_TRIGGER_KINDS[:4]  # the grid's default
DRIFT_MODES: tuple[str, ...] = get_args(DriftMode)
DRIFT_OBJECTIVES: tuple[str, ...] = get_args(DriftObjective)
FAMILIES: tuple[str, ...] = get_args(Family)

#: the calibrated probability's inputs: the search's divergence scores, and the collapse the default rule decides by,
#: searched and typed (the typed probe's evidence decides most flags since the scan stops at its first pass)
DEFAULT_FEATURES = ["log1p_divergence_ratio", "log1p_pooled_divergence_ratio", "assimilation_gap",
                    "assimilation_ratio", "unshared_collapse", "pooled_unshared_collapse",
                    "typed_unshared_collapse", "typed_pooled_unshared_collapse"]
#: sections of a benchmark config that the Lightning CLI reads, not `BenchmarkOptions`
CLI_SECTIONS = ("trainer", "seed_everything", "model", "data")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class BaseSpec:
    """A clean base as the config names it: ``path`` (a checkpoint folder or a built-in name such as minilm),
    ``name`` in tables and member names (default: the family, else the folder name), and an optional
    ``family`` checked against the checkpoint when the benchmark loads it."""

    path: str
    name: Optional[str] = None
    family: Optional[Family] = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("a base needs a path (a checkpoint folder or built-in name such as minilm)")
        self.name = self.name or self.family or Path(str(self.path)).name
        if not SAFE_NAME.match(self.name):
            raise ConfigError(f"base name {self.name!r} must be letters, digits, '.', '_' or '-'")


@dataclass
class SplitSize:
    """Members of one split, per base."""

    backdoored: NonNegativeInt = 20
    benign: NonNegativeInt = 20


@dataclass
class Sizes:
    """Members per split and base."""

    calibration: SplitSize = field(default_factory=SplitSize)
    test: SplitSize = field(default_factory=SplitSize)

    def of(self, split: str) -> SplitSize:
        return getattr(self, split)

    def total(self) -> int:
        return sum(s.backdoored + s.benign for s in (self.calibration, self.test))


@dataclass
class ZooGrid:
    """What `plan_zoo` samples members from."""

    attacks: list[Attack] = field(default_factory=lambda: list(ATTACKS))
    trigger_kinds: list[TriggerKind] = field(default_factory=lambda: list(TRIGGER_KINDS))
    attack_steps: list[PositiveInt] = field(default_factory=lambda: [50, 100, 200])
    backdoor_weights: list[PositiveFloat] = field(default_factory=lambda: [0.05, 0.1, 0.3])
    attack_lrs: list[PositiveFloat] = field(default_factory=lambda: [1e-4, 3e-4])
    benign_lrs: list[PositiveFloat] = field(default_factory=lambda: [1e-6, 5e-6, 2e-5, 1e-4])
    benign_steps: list[PositiveInt] = field(default_factory=lambda: [20, 60, 200])
    benign_samples: list[PositiveInt] = field(default_factory=lambda: [5000, 20000])

    def __post_init__(self) -> None:
        for name, values in asdict(self).items():
            if not values:
                raise ConfigError(f"grid.{name} is empty")


@dataclass
class Control:
    """A benign fine-tune of a chosen strength added to ``split`` of every base's zoo: a drift-matched control,
    placed where the backdoored members' drift lies (the grid's benign strengths may straddle it)."""

    split: Split
    lr: PositiveFloat
    steps: PositiveInt
    samples: PositiveInt = 5000


@dataclass
class AdaptiveSettings:
    """Adaptive attackers: ``per_attack`` text-on-text members of each of ``attacks`` per base, in the test
    split with its triggers and targets, scanned like the rest and reported in a table of their own (never
    used for calibration). ``sim_x_penalty``: the penalty weight of the attacks that pay for Sim_X (every one
    but pooled_only); ``consistency_penalty``: pooled_consistency_penalty's weight on pooled consistency;
    ``clean_pooled_weight``: the ``_kept_near`` attacks' weight on the clean prompts' sentence embeddings.

    ``drift_to``: hide each adaptive backdoor under benign drift too, as a reader of the README would (the
    charged path counts only near the anchor): after the injection a SimCSE fine-tune at ``finetune_lr`` for at
    most ``finetune_steps`` until this clean cosine to the base (the drift sweep's ``then_finetune``); members
    are named ``...-drift<level>-NNN``. None: no fine-tune. ``null_evading`` is planned at its own level
    whatever ``drift_to`` says: it drifts while it plants, to ``null_evading_drift`` (below 0.95, where the token
    path's null is read), paying ``insertion_weight`` for every change inserted tokens make."""

    attacks: list[AdaptiveAttack] = field(default_factory=lambda: ["pooled_only", "sim_x_penalty"])
    per_attack: NonNegativeInt = 0
    sim_x_penalty: PositiveFloat = 1.0
    consistency_penalty: PositiveFloat = 1.0
    clean_pooled_weight: PositiveFloat = 1.0
    drift_to: PositiveFloat | None = None
    finetune_lr: PositiveFloat = 1e-4
    finetune_steps: PositiveInt = 300
    insertion_weight: PositiveFloat = 5.0
    null_evading_drift: PositiveFloat = 0.85

    def __post_init__(self) -> None:
        if self.drift_to is not None and not 0 < self.drift_to <= 1:
            raise ConfigError(f"adaptive.drift_to is a clean cosine in (0, 1], got {self.drift_to}")
        if not 0 < self.null_evading_drift < 1:
            raise ConfigError(f"adaptive.null_evading_drift is a clean cosine in (0, 1), got {self.null_evading_drift}")


@dataclass
class DriftSweepSettings:
    """The drift sweep (issue 17): members trained to chosen drift levels, so the detector is measured where a
    backdoor hides under large benign drift and against benign models far from their base.

    Per base, level of ``levels`` (the clean cosine to the base to stop at) and kind: ``per_level`` benign
    members of each of ``benign_objectives`` (``auto``: infonce with an image tower, else simcse;
    ``typo_robust``: SimCSE against typo'd copies, a benign many-to-one map) and ``per_level`` text-on-text
    backdoored members of each (``backdoor_modes`` x ``trigger_kinds``): ``then_finetune`` injects as the
    grid does, then fine-tunes the backdoored model with SimCSE until the level; ``during_finetune`` plants the
    backdoor while SimCSE moves the model (`BackdoorInjection`'s ``utility_objective: simcse``). Every
    ``two_backdoors_every``-th backdoored member carries a second backdoor (0: never). ``kinds_per_level``
    (None: all) makes each (level, mode) take only that many trigger kinds, rotating through ``trigger_kinds`` from
    one (level, mode) to the next so every kind still appears (a smaller sweep). Members draw triggers,
    targets and seeds from ``split``'s pools. ``per_level: 0`` (the default) plans no sweep.

    Steps are caps: training stops at the level. ``benign_lr`` / ``benign_steps``: the benign fine-tunes;
    ``attack_lr`` / ``attack_steps`` / ``backdoor_weight``: the injection (``during_finetune``: ``attack_steps``
    is the least it trains, so the backdoor is planted, and ``finetune_steps`` the cap); ``finetune_lr`` /
    ``finetune_steps``: the fine-tune after a ``then_finetune`` injection. ``typo_rate``: typo_robust's.
    ``benign_lr`` and ``finetune_lr`` may be lists, one lr per level: how far a fine-tune can move a model at one
    lr is bounded (SimCSE at 1e-4 levels off near 0.82 on the CLIP world base), so far levels need larger steps
    and near ones small steps, or they overshoot between two drift measurements.
    """

    levels: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85, 0.9, 0.95, 0.99])
    benign_objectives: list[DriftObjective] = field(default_factory=lambda: ["auto", "typo_robust"])
    backdoor_modes: list[DriftMode] = field(default_factory=lambda: list(DRIFT_MODES))
    trigger_kinds: list[TriggerKind] = field(default_factory=lambda: ["homoglyph", "word", "multi_token"])
    two_backdoors_every: NonNegativeInt = 3
    kinds_per_level: PositiveInt | None = None
    per_level: NonNegativeInt = 0
    split: Split = "test"
    benign_lr: PositiveFloat | list[PositiveFloat] = 1e-4
    benign_steps: PositiveInt = 300
    benign_samples: PositiveInt = 20000
    typo_rate: PositiveFloat = 0.1
    attack_lr: PositiveFloat = 5e-4
    attack_steps: PositiveInt = 100
    backdoor_weight: PositiveFloat = 0.1
    finetune_lr: PositiveFloat | list[PositiveFloat] = 1e-4
    finetune_steps: PositiveInt = 300

    def lr_at(self, name: str, level_index: int) -> float:
        """``benign_lr`` or ``finetune_lr`` at the level of index ``level_index``."""
        value = getattr(self, name)
        return float(value[level_index] if isinstance(value, list) else value)

    def __post_init__(self) -> None:
        for name in ("benign_lr", "finetune_lr"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != len(self.levels):
                raise ConfigError(f"drift_sweep.{name}: one lr per level ({len(self.levels)}), got {len(value)}")
        bad = [v for v in self.levels if not 0 < v <= 1]
        if bad:
            raise ConfigError(f"drift_sweep.levels are clean cosines in (0, 1], got {bad[0]}")
        if len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"drift_sweep.levels must be distinct, got {self.levels}")
        if self.per_level and not (self.levels and (self.benign_objectives or
                                                    (self.backdoor_modes and self.trigger_kinds))):
            raise ConfigError("drift_sweep: per_level > 0 but no level, objective or (mode, trigger kind) to plan")


@dataclass
class TrainSettings:
    """How every member is trained (the grid says how hard).

    ``pooled_weight``: text-on-text pooled-embedding match (None: 1.0 for open_clip, which needs it, else 0).
    ``accelerator``: auto, cpu or gpu; a process uses one device (its ``LOCAL_RANK``'s GPU).
    ``drift_every``, ``drift_prompts``, ``drift_max_length``: how members with a drift target measure their drift
    while they train (`lit_amdet.callbacks.DriftStop`; the scan's ``drift_prompts`` measure it after).
    """

    batch_size: PositiveInt = 32
    poisoned_batch_size: PositiveInt = 16
    max_length: PositiveInt = 32
    num_samples: PositiveInt = 20000
    val_fraction: float = 0.02
    val_batches: PositiveInt = 2
    distractors: PositiveInt = 100
    image_size: PositiveInt = 64
    pooled_weight: Optional[float] = None
    accelerator: str = "auto"
    precision: str = "32-true"
    drift_every: PositiveInt = 10
    drift_prompts: PositiveInt = 200
    drift_max_length: PositiveInt = 32


@dataclass
class ScanSettings:
    """How every member is scanned: the ``detect`` config ``config`` (a file, or a shipped config's name) plus
    ``overrides`` as dotted keys (``{"trainer.max_steps": 100, "model.init_args.probe_prompts": 200}``), on one
    device (``accelerator``: auto, cpu or gpu).

    The drift to the base is measured on ``drift_prompts`` held-out prompts of ``drift_max_length`` tokens;
    the caption bank holds ``bank_captions`` held-out world captions plus every target caption. ``anchored:
    false`` scans every member without an anchor (the no-anchor path, measured on the same zoo).
    """

    config: str = "configs/scan.yaml"
    overrides: dict = field(default_factory=dict)
    drift_prompts: PositiveInt = 200
    drift_max_length: PositiveInt = 32
    bank_captions: NonNegativeInt = 300
    accelerator: str = "auto"
    anchored: bool = True


@dataclass
class BenchmarkOptions:
    """Everything ``lit-amdet benchmark`` takes (see `AmdetTrainer.benchmark` for the meaning of each)."""

    bases: list[BaseSpec]
    output_dir: str = "runs/benchmark"
    zoo_dir: Optional[str] = None
    sizes: Sizes = field(default_factory=Sizes)
    grid: ZooGrid = field(default_factory=ZooGrid)
    train: TrainSettings = field(default_factory=TrainSettings)
    scan: ScanSettings = field(default_factory=ScanSettings)
    adaptive: AdaptiveSettings = field(default_factory=AdaptiveSettings)
    drift_sweep: DriftSweepSettings = field(default_factory=DriftSweepSettings)
    controls: list[Control] = field(default_factory=list)
    calibration_features: list[str] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    seed: int = 0
    wait_timeout: PositiveFloat = 86400.0

    def __post_init__(self) -> None:
        if not self.bases:
            raise ConfigError("benchmark needs at least one base: bases: [{name: NAME, path: CHECKPOINT}]")
        names = [b.name for b in self.bases]
        if len(set(names)) != len(names):
            raise ConfigError(f"base names must be unique, got {names}")
        if self.sizes.total() == 0 and self.zoo_dir is None:
            raise ConfigError("zero members: every size is 0 and no zoo_dir of existing models is given")
        if not self.calibration_features:
            raise ConfigError("calibration_features is empty")
        check_writable_folder(self.output_dir)
        check_writable_folder(self.zoo_dir, "zoo folder")

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def zoo(self) -> Path:
        return Path(self.zoo_dir) if self.zoo_dir else self.out / "zoo"

    def describe(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def parse_options(config: dict) -> BenchmarkOptions:
    """The options of a benchmark config's values (what ``lit-amdet benchmark --config`` reads; its
    `CLI_SECTIONS` are left to the CLI), checked by jsonargparse on these dataclasses.

    Raises jsonargparse's ``ArgumentError`` for unknown keys and wrong types, `ConfigError` for bad values.
    """
    from jsonargparse import ArgumentParser

    if not isinstance(config, dict):
        raise ConfigError(f"a benchmark config is a mapping, got {type(config).__name__}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(BenchmarkOptions, "options")
    values = parser.parse_object({"options": {k: v for k, v in config.items() if k not in CLI_SECTIONS}})
    return parser.instantiate(values).options


def load_options(path: str | Path) -> BenchmarkOptions:
    """`parse_options` of a YAML config file; an unreadable file is a one-line `ConfigError`."""
    return parse_options(read_yaml(path, "benchmark config"))
