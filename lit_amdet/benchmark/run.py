"""The whole benchmark: plan -> build -> scan (this process's share) -> [process 0] calibrate, measure, report;
and the report of an unfinished run from the scan records it has written."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from lit_amdet.benchmark.build import build_zoo
from lit_amdet.benchmark.members import ZooEntry, read_zoo, zoo_entry
from lit_amdet.benchmark.metrics import (
    adaptive_metrics,
    attack_strength,
    benchmark_metrics,
    drift_sweep_metrics,
    member_row,
)
from lit_amdet.benchmark.options import SPLITS, BenchmarkOptions
from lit_amdet.benchmark.plan import (
    Member,
    ZooBase,
    plan_adaptive,
    plan_controls,
    plan_drift_sweep,
    plan_zoo,
    resolve_bases,
)
from lit_amdet.benchmark.processes import current_shard, wait_for_files
from lit_amdet.benchmark.report import markdown
from lit_amdet.benchmark.scan import Detect, scan_zoo
from lit_amdet.calibration import feature_values, fit_calibration
from lit_amdet.captions import world_caption_bank
from lit_amdet.decision import CalibratedRule
from lit_amdet.errors import ConfigError, LitAmdetError
from lit_amdet.io import read_json, write_json, write_text


def run_benchmark(options: BenchmarkOptions, rank: int | None = None, world_size: int | None = None, *,
                  detect: Detect) -> dict | None:
    """plan -> build -> scan (this process's share) -> [process 0] wait, calibrate, measure, write the report.

    ``detect(trainer, model, datamodule)`` runs one scan (`lit_amdet.commands.detect` from the CLI).
    Writes into ``options.output_dir``: plan.json, caption_bank.txt, scans/, calibration.json, benchmark.json
    and benchmark.md (the zoo goes to ``options.zoo``). Returns the report on process 0, None elsewhere.
    """
    shard = current_shard(rank, world_size)
    out, zoo = options.out, options.zoo
    bases = resolve_bases(options.bases)
    plan = full_plan(options, bases)
    planned = {m.name for m in plan}
    # models people put into the zoo themselves; read before any build, so every process sees the same list
    extras, ignored = [], []
    for path in read_zoo(zoo):
        if path.name in planned:
            continue
        entry = zoo_entry(path, bases)
        (extras if entry is not None else ignored).append(entry or path)
    _check_splits(plan, extras)
    out.mkdir(parents=True, exist_ok=True)
    if shard.rank == 0:
        write_json(out / "plan.json", {"members": [m.describe() for m in plan],
                                       "extra_members": [e.facts() for e in extras]})
    bank = out / "caption_bank.txt"
    texts = world_caption_bank([getattr(m, "target_caption", None) for m in plan]
                               + [e.target_caption for e in extras], options.scan.bank_captions)
    write_text(bank, "\n".join(texts) + "\n")  # every process writes the same text, atomically

    build_zoo(plan, bases, zoo, options.train, shard)
    members = [zoo / m.name for m in plan] + [e.path for e in extras]  # plan first: each scans what it built
    scan_zoo(members, bases, out, options.scan, bank, shard, detect=detect)
    if shard.rank != 0:
        return None
    paths = [out / "scans" / f"{p.name}.json" for p in members]
    records = [read_json(p, "scan record") for p in wait_for_files(paths, options.wait_timeout, "scan")]
    report = summarise(records, options, bases, ignored)
    write_json(out / "benchmark.json", report)
    write_text(out / "benchmark.md", markdown(report))
    return report


def full_plan(options: BenchmarkOptions, bases: Sequence[ZooBase]) -> list[Member]:
    """Every planned member of ``bases``: both splits, then the controls, the adaptive attackers and the drift
    sweep (none unless ``drift_sweep.per_level`` is set)."""
    plan = [m for b in bases for split in SPLITS
            for m in plan_zoo(b, options.sizes.of(split).backdoored, options.sizes.of(split).benign, split,
                              options.seed, options.grid)]
    plan += [m for b in bases for m in plan_controls(b, options.controls, options.seed)]
    plan += [m for b in bases for m in plan_adaptive(b, options.adaptive, options.seed, options.grid)]
    return plan + [m for b in bases for m in plan_drift_sweep(b, options.drift_sweep, options.seed)]


def summarise_scanned(options: BenchmarkOptions, out_dir: str | Path, only: Sequence[str] | None = None) -> dict:
    """The report of a run that is still going or was stopped, from the scan records already written.

    A base counts when every planned member of its calibration and test zoos (controls included) has its
    record; its adaptive attackers count as far as they are scanned. Other bases are left out and named in
    ``report["partial"]``. Written to ``out_dir`` (benchmark.json, benchmark.md, calibration.json), never into
    the run's folder, whose report stays the finished run's. Members people added to the zoo are not read.
    """
    scans = options.out / "scans"
    bases = [b for b in resolve_bases(options.bases) if not only or b.name in only]
    if only and len(bases) != len(set(only)):
        raise ConfigError(f"unknown base(s) {sorted(set(only) - {b.name for b in bases})}")
    records, left_out, unscanned = [], {}, []
    for base in bases:
        plan = full_plan(options, [base])
        missing = [m.name for m in plan if not (scans / f"{m.name}.json").is_file()]
        if any(m.name in missing for m in plan if not getattr(m, "adaptive", None)):
            left_out[base.name] = len(missing)
            continue
        unscanned += missing
        records += [read_json(scans / f"{m.name}.json", "scan record") for m in plan if m.name not in missing]
    kept = [b for b in bases if b.name not in left_out]
    if not kept:
        raise LitAmdetError(f"no base has all its calibration and test scans in {scans} (missing: {left_out})")
    sub = replace(options, bases=[b for b in options.bases if b.name in {k.name for k in kept}],
                  output_dir=str(out_dir))
    report = summarise(records, sub, kept)
    report["partial"] = {"run": str(options.out), "left_out_bases": left_out, "unscanned_adaptive": unscanned}
    write_json(sub.out / "benchmark.json", report)
    write_text(sub.out / "benchmark.md", markdown(report))
    return report


def _check_splits(plan: Sequence[Member], extras: Sequence[ZooEntry]) -> None:
    items = [(m.split, m.backdoored) for m in plan] + [(e.split, e.backdoored) for e in extras]
    if not items:
        raise ConfigError("zero members: every size is 0 and the zoo folder holds no member of these bases")
    cal = [b for s, b in items if s == "calibration"]
    if not any(cal) or all(cal):
        raise ConfigError(f"the calibration zoo needs backdoored and benign members; it has {sum(cal)} backdoored "
                          f"and {len(cal) - sum(cal)} benign")
    if not any(s == "test" for s, _ in items):
        raise ConfigError("the test zoo is empty: give sizes.test")


def summarise(records: Sequence[dict], options: BenchmarkOptions, bases: Sequence[ZooBase],
              ignored: Sequence[Path] = ()) -> dict:
    """Calibrate on the calibration split, apply to every member, and measure both splits."""
    rows = [member_row(r) for r in records]
    calibration_rows = [r for r in rows if r["split"] == "calibration" and not r["adaptive"]]
    rule = read_json(calibration_rows[0]["report"], "scan report")["rule"]
    per_prompt = {k: rule[k] for k in ("assimilation_threshold", "same_target_cos", "drift_floor") if k in rule}
    calibration = fit_calibration(calibration_rows, options.calibration_features, per_prompt)
    path = options.out / "calibration.json"
    write_json(path, calibration)
    calibrated = CalibratedRule(str(path))
    for r in rows:
        feature_values(r, options.calibration_features)  # a missing score is an error naming it
        r["probability"] = calibrated.probability(r["scores"])
        r["calibrated_backdoored"] = r["probability"] > calibrated.threshold
    metrics = benchmark_metrics([r for r in rows if not r["adaptive"]], calibrated.threshold,
                                options.calibration_features)
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "options": options.describe(),
            "bases": [asdict(b) for b in bases], "scan_rule": rule.get("class"),
            "calibration": {**calibration, "path": str(path)}, "metrics": metrics,
            "adaptive": adaptive_metrics(rows, calibrated.threshold), "attack_strength": attack_strength(rows),
            "drift_sweep": drift_sweep_metrics(rows, calibrated.threshold),
            "members": rows,
            "ignored": [str(p) for p in ignored]}
