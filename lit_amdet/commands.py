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
    """Embed every pair of ``datamodule`` with ``model`` (a `SampleEmbedding`) through ``trainer.predict`` and
    score it for poisoning on process 0 (`lit_amdet.sample_scan.score_and_report`); the report dict there, {} on
    the other processes (the arguments are `AmdetTrainer.scan_data`'s)."""
    from lit_amdet import sample_scan
    from lit_amdet.modules.data_scan import SampleEmbedding
    from lit_amdet.outliers import check_reference_size

    if not isinstance(model, SampleEmbedding):
        raise ConfigError(f"scan_data needs --model lit_amdet.modules.data_scan.SampleEmbedding "
                          f"(got {type(model).__name__})")
    if datamodule is None:
        raise ConfigError("scan_data needs data: --data lit_amdet.datamodules.TextEncoderDataModule --data.source ...")
    names = sample_scan.check_detectors(detectors)
    modality = model.hparams.modality
    has_images = getattr(datamodule, "has_images", None)
    # Cheap checks before an embedding pass that may take many GPU-minutes.
    if has_images is False and (modality != "text" or "clip" in names):
        raise ConfigError(f"{'the clip detector' if modality == 'text' else f'modality {modality!r}'} needs "
                          "images, but the data has none (set data.image_column)")
    if "clip" in names and not model.encoder.has_image_tower:
        raise ConfigError(f"the clip detector needs an image tower; {model.encoder.name} has none; "
                          "drop it from detectors")
    if labels is not None and getattr(datamodule, "dataset", None) is not None:
        sample_scan.read_labels(labels, len(datamodule.dataset))
    if reference_size is not None and getattr(datamodule, "dataset", None) is not None:
        try:  # before anything is written to the run folder
            check_reference_size(k, reference_size, reference_draws, len(datamodule.dataset))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    predictions = trainer.predict(model, datamodule)
    if not predictions:
        raise LitAmdetError("predict returned nothing (spawn-based strategies return no predictions; "
                            "use strategy: ddp)")
    data = sample_scan.gather_predictions(predictions)
    if not trainer.is_global_zero:
        return {}
    out = Path(output_dir)
    sample_scan.save_embeddings(out / sample_scan.EMBEDDINGS, data, modality, model.hparams.encoder)
    features = sample_scan.sample_features(data["image"], data["text"], modality)
    image_text = (data["image"], data["text"]) if data["image"] is not None else None
    return sample_scan.score_and_report(
        features, data["caption"], labels, names, k, out, image_text=image_text, indices=data["index"].numpy(),
        image_loader=sample_scan.dataset_image_loader(datamodule), top=top, chunk_size=chunk_size,
        device=trainer.strategy.root_device, log_image=sample_scan.image_logger(trainer.loggers),
        reference_size=reference_size, reference_draws=reference_draws)


def benchmark(trainer: Trainer, options) -> dict | None:
    """Run the detection benchmark (``options``: `lit_amdet.benchmark.BenchmarkOptions`), every member scanned
    with `detect`; the report on process 0, None elsewhere.

    Under DDP Lightning's launcher starts the other processes (which run this same command) and then calls the
    benchmark in each; otherwise it runs here (under torchrun each process is already started).
    """
    from lit_amdet.benchmark import run_benchmark

    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.world_size > 1 and launcher is not None:
        return launcher.launch(run_benchmark, options, trainer.global_rank, trainer.world_size, trainer=trainer,
                               detect=detect)
    return run_benchmark(options, detect=detect)


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
