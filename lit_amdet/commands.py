"""The project's subcommands as plain functions over objects (the Lightning level).

``lit-amdet detect`` / ``inspect`` / ``scan-data`` / ``benchmark`` are methods of
`lit_amdet.cli.AmdetTrainer` that delegate here in a few lines; code that wants
a scan without the command line (the benchmark, a notebook) builds a Trainer, a
`BackdoorDetection` and a DataModule and calls `detect` the way anomalib's
benchmark jobs call ``engine.fit``. Nothing here reads ``sys.argv`` or exits the
process: the CLI turns a verdict into an exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from lit_amdet.errors import ConfigError, LitAmdetError

#: the sample detectors scan-data runs by default
DETECTORS = ("kdist", "lid", "slof", "dao", "iforest", "lof", "clip")


def detect(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule | None = None,
           quiet: bool = False) -> dict:
    """Run the AMDET scan ``model`` (a `BackdoorDetection`) on ``trainer``; its verdict dict.

    The prompts come from ``datamodule`` (default: the built-in world's). Under DDP every process runs this
    same scan; process 0 writes the run folder and (unless ``quiet``) prints the summary.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.modules import BackdoorDetection

    if not isinstance(model, BackdoorDetection):
        raise ConfigError(f"detect needs model: lit_amdet.modules.BackdoorDetection, not {type(model).__name__}")
    model.use_prompts(datamodule if datamodule is not None else TextEncoderDataModule())
    # the scan's result is the run folder, not a checkpoint of the frozen encoders
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    try:
        trainer.fit(model)  # through the strategy's launcher: DDP processes each run this same scan
    finally:
        model.discard_staging()  # a failed scan leaves no half-written run folder behind
    verdict = model.verdict
    if verdict is None:
        raise LitAmdetError("the scan ended without a verdict (interrupted?)")
    if trainer.is_global_zero and not quiet:
        print(summary(verdict, getattr(model, "report", None), getattr(model, "run_dir", None)))
    return verdict


def inspect(checkpoint: str, model_name: str | None = None, allow_pickle: bool = False) -> dict:
    """Load a checkpoint safely and describe it (family, sizes, context, sha256)."""
    from lit_amdet.encoders import file_sha256, load_encoder

    if not checkpoint:
        raise ConfigError("inspect needs --checkpoint PATH (a model folder, or a weights file with --model_name)")
    adapter = load_encoder(checkpoint, model_name=model_name, allow_pickle=allow_pickle)
    facts = adapter.describe()
    facts["sha256"] = file_sha256(adapter.source_path)
    return facts


def scan_data(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule | None,
              detectors: Sequence[str] = DETECTORS, k: int = 16, labels: str | None = None,
              output_dir: str = "runs/scan_data", top: int = 16, chunk_size: int = 1024,
              reference_size: int | None = None, reference_draws: int = 8) -> dict:
    """Embed every pair of ``datamodule`` with ``model`` (a `SampleEmbedding`) and score it for poisoning
    (the arguments are `AmdetTrainer.scan_data`'s)."""
    from lit_amdet.modules.data_scan import run_scan

    return run_scan(trainer, model, datamodule, detectors, k, labels, output_dir, top, chunk_size, reference_size,
                    reference_draws)


def summary(verdict: dict, report: dict | None = None, run_dir: Path | None = None) -> str:
    """A few lines a person reads: the deciding checks, what the trigger makes the model say, the verdict."""
    s = verdict["scores"]
    lines = [f"scan of {verdict['model']} ({verdict['rule']}): decided by {verdict['decided_by']}"]
    for c in verdict["checks"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"  {'pass' if c['passed'] else 'fail'}  {c['name']} = {value} (needs {c['op']} {c['threshold']})")
    lines.append(f"  Sim_X with trigger {s['assimilation']:.3f}, clean {s['assimilation_clean']:.3f}, "
                 f"random trigger {s['assimilation_random_trigger']:.3f}")
    if not s.get("anchor_used"):
        lines.append("  note: no anchor given, so natural backdoors of a clean pretrained model can look the same as "
                     "an injected one; give --model.init_args.anchor BASE for a verdict that separates them")
    if report is not None:
        if report["nearest_captions"]:
            top = report["nearest_captions"][0]
            lines.append(f"  with the trigger the model says: \"{top['caption']}\" (cos {top['cosine']:.3f})")
        lines.append(f"  report: {Path(run_dir) / 'report.json'} ({report['seconds']:.1f} s)")
    lines.append(f"{verdict['model']}: {verdict['verdict']}")
    return "\n".join(lines)
