"""Model zoos and the detection benchmark behind ``lit-amdet benchmark`` (plain Python; Lightning only to train
and to build each scan from its config).

A zoo is a plain folder with one sub-folder per model: the model in its
family's native format and a ``backdoor.json`` holding the ground truth
(``"backdoored"``; for a backdoored model also its trigger and target). Anyone
can put their own models there beside the ones `build_zoo` trains; folders whose
name starts with a dot (a build in progress) are never members (`members`).

The benchmark (`run_benchmark`, `run`) is plan -> build -> scan -> calibrate -> metrics:

- `plan_zoo` (`plan`) samples backdoored members (attack kind, trigger kind and text,
  target, strength, seed) and benign fine-tunes (objective, lr, steps, data)
  from grids. The ``calibration`` and ``test`` splits draw triggers, targets and
  seeds from disjoint pools, so the thresholds fitted on one are reported on
  models with triggers, targets and seeds they never saw. Benign members run
  from gentle to strong fine-tunes so that their drift from the base spans the
  backdoored members' (SPEC §7: a statistic that only measures drift separates a
  zoo whose benign members all drifted further, and means nothing);
- `build_member` (`build`) trains one member in this process and moves it into place in
  one rename, so a member is complete or absent and a rerun skips it;
- `scan_member` (`scan`) builds the ``detect`` scan from the scan config exactly as
  ``lit-amdet detect --config`` does, anchored on the member's base, runs it through the
  ``detect`` callable it is given (`lit_amdet.commands.detect` from the CLI), keeps the run
  folder (``report.json``) and records seconds, peak memory and the member's drift (mean
  cosine of clean pooled embeddings to the base);
- `lit_amdet.calibration.fit_calibration` fits a logistic regression on the calibration zoo's raw
  scan scores; `lit_amdet.decision.CalibratedRule` applies it (to the test zoo
  here, or inside any ``detect`` run that names it);
- `benchmark_metrics` (`metrics`): precision, recall, F1 (the scan's own verdict and the
  calibrated one), AUROC, binary cross-entropy and Brier score of the calibrated
  probability, target recovery, drift distributions and F1 on the drift-matched
  subset, seconds and memory per scan; per family and per attack kind.

Distribution (`processes`): members are dealt round-robin to processes by rank and world
size (``RANK``/``WORLD_SIZE`` as torchrun sets them, Lightning's DDP launcher
through ``lit-amdet benchmark --trainer.strategy ddp --trainer.devices N``, or
an initialised ``torch.distributed``). Each process builds, then scans, its own
share one model at a time; process 0 then waits for every scan record and
writes the report.

This package never imports `lit_amdet.cli` or `lit_amdet.commands`: the command layer imports it.
"""

from lit_amdet.benchmark.build import STAGING_PREFIX, build_member, build_zoo, check_built_as_planned, train_member
from lit_amdet.benchmark.members import ZooEntry, is_member, read_zoo, zoo_entry
from lit_amdet.benchmark.metrics import (
    WORKING_ATTACK_TOP1,
    adaptive_metrics,
    attack_strength,
    benchmark_metrics,
    drift_sweep_metrics,
    group_metrics,
    member_row,
)
from lit_amdet.benchmark.options import (
    ADAPTIVE_ATTACKS,
    ALL_TRIGGER_KINDS,
    ATTACKS,
    DEFAULT_FEATURES,
    DRIFT_MODES,
    DRIFT_OBJECTIVES,
    FAMILIES,
    SPLITS,
    TRIGGER_KINDS,
    AdaptiveSettings,
    BaseSpec,
    BenchmarkOptions,
    Control,
    DriftSweepSettings,
    ScanSettings,
    Sizes,
    SplitSize,
    TrainSettings,
    ZooGrid,
    load_options,
    parse_options,
)
from lit_amdet.benchmark.plan import (
    TRIGGER_POOLS,
    BackdooredMember,
    BenignMember,
    Member,
    ZooBase,
    member_from_dict,
    plan_adaptive,
    plan_controls,
    plan_drift_sweep,
    plan_zoo,
    resolve_bases,
)
from lit_amdet.benchmark.processes import Shard, current_shard, one_process
from lit_amdet.benchmark.report import markdown
from lit_amdet.benchmark.run import full_plan, run_benchmark, summarise, summarise_scanned
from lit_amdet.benchmark.scan import Detect, PeakMemory, clean_cosine_to_base, scan_member, scan_zoo
from lit_amdet.callbacks.drift import DRIFT_WORLD_SEED

__all__ = [
    "ADAPTIVE_ATTACKS", "ALL_TRIGGER_KINDS", "ATTACKS", "DEFAULT_FEATURES", "DRIFT_MODES", "DRIFT_OBJECTIVES",
    "DRIFT_WORLD_SEED", "FAMILIES", "SPLITS", "STAGING_PREFIX", "TRIGGER_KINDS", "TRIGGER_POOLS",
    "WORKING_ATTACK_TOP1", "AdaptiveSettings", "BackdooredMember", "BaseSpec", "BenchmarkOptions", "BenignMember",
    "Control", "Detect", "DriftSweepSettings", "Member", "PeakMemory", "ScanSettings", "Shard", "Sizes",
    "SplitSize", "TrainSettings", "ZooBase", "ZooEntry", "ZooGrid", "adaptive_metrics", "attack_strength",
    "benchmark_metrics", "build_member", "build_zoo", "check_built_as_planned", "clean_cosine_to_base",
    "current_shard", "drift_sweep_metrics", "full_plan", "group_metrics", "is_member", "load_options", "markdown",
    "member_from_dict", "member_row", "one_process", "parse_options", "plan_adaptive", "plan_controls",
    "plan_drift_sweep", "plan_zoo", "read_zoo", "resolve_bases", "run_benchmark", "scan_member", "scan_zoo",
    "summarise", "summarise_scanned", "train_member", "zoo_entry",
]
