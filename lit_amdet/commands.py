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
from typing import TYPE_CHECKING, Sequence

from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything

from lit_amdet.decision import verdict_word
from lit_amdet.errors import ConfigError, LitAmdetError
from lit_amdet.io import check_writable_folder
from lit_amdet.outliers import SAME_CAPTION

if TYPE_CHECKING:
    from lit_amdet.outliers import DaoForm, Variant

#: the ranking scan-data's budget cuts by default (`lit_amdet.metrics.combine`): half the budget to what DAO or
#: xgroup alone ranks near the top (their rank union), half to what both rank fairly high (their rank product)
CUT_BY = "(dao+xgroup)+dao*xgroup"
#: the sample detectors scan-data runs by default
DETECTORS = ("kdist", "lid", "slof", "dao", "iforest", "lof", "clip", "xmodal", "xgroup", CUT_BY)


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
    check_writable_folder(model.hparams.output_dir, "run folder")  # found otherwise after the scan
    check_writable_folder(trainer.default_root_dir, "trainer.default_root_dir")
    datamodule = datamodule if datamodule is not None else TextEncoderDataModule()
    if model.several:
        return screen(trainer, model, datamodule)
    if model.probe is None:
        model.use_prompts(datamodule)
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


def screen(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule) -> dict:
    """Scan every encoder ``model`` names (several suspects, a folder of them, SDXL's two text encoders), each
    with a `BackdoorDetection` and a Trainer of its own, the anchor loaded and the prompts built once; with
    several processes they are dealt round-robin. Process 0 writes ``summary.csv``/``summary.md`` and returns
    ``{"verdict": worst verdict, "rows": [...], "summary": path}``; the other processes return their rows."""
    hp = model.hparams
    root = Path(hp.output_dir) if hp.output_dir else Path(trainer.default_root_dir) / "detect"
    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.world_size > 1 and launcher is not None:
        return launcher.launch(_screen_process, trainer, model, datamodule, root, trainer.global_rank,
                               trainer.world_size, trainer=trainer)
    return _screen_process(trainer, model, datamodule, root, 0, 1)


def _screen_process(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule, root: Path,
                    rank: int, world_size: int) -> dict:
    from lit_amdet import screening
    from lit_amdet.benchmark.processes import choose_device, one_process, wait_for_files
    from lit_amdet.io import read_json, write_json

    device = choose_device(str(getattr(trainer, "init_kwargs", {}).get("accelerator", "auto")))
    args = {k: v for k, v in model.hparams.items() if k != "rule" and not k.startswith("_")}
    prompts: list = []

    def scan_one(target, run_dir: Path) -> dict:
        seed_everything(args["seed"], verbose=False)  # each scan as it would run alone
        scan = type(model)(**{**args, "suspect": target.ref, "component": target.component, "name": target.label,
                              "output_dir": str(run_dir)}, rule=model.rule)
        if prompts:
            scan.share_prompts(prompts[0])
        else:
            scan.use_prompts(datamodule)
            prompts.append(scan)
        with one_process():
            return detect(screening.target_trainer(trainer, target.label, device), scan, quiet=True)

    with screening.anchors_loaded_once():
        rows = screening.screen_share(model.targets, root, scan_one, rank, world_size)
    mine = root / f".screen-rank{rank}-of-{world_size}.json"
    write_json(mine, rows)
    if rank != 0:
        return {"verdict": screening.worst([r["verdict"] for r in rows]), "rows": rows}
    parts = wait_for_files([root / f".screen-rank{r}-of-{world_size}.json" for r in range(world_size)],
                           timeout=86400.0, what="screening share")
    shares = [read_json(p, "screening share") for p in parts]
    # process r scanned targets r, r + N, ...: dealt back, the rows are in the targets' order
    rows = [shares[i % world_size][i // world_size] for i in range(len(model.targets))]
    models = screening.model_rows(rows)
    csv_path, md_path = screening.write_summary(root, rows + models)
    for p in parts:
        p.unlink()
    for r in models:
        print(f"{r['model']}: {r['verdict']} ({r['decided_by']})")
    print(f"summary: {csv_path} and {md_path.name}")
    return {"model": f"{len(model.targets)} encoders", "verdict": screening.worst([r["verdict"] for r in rows]),
            "rows": rows + models, "summary": str(csv_path)}


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
              reference_size: int | None = None, reference_draws: int = 8, budget: float | int | None = None,
              cut_by: str = CUT_BY, write_shards: bool = False, variant: Variant = "exact",
              dao_form: DaoForm = "log", same_caption: float = SAME_CAPTION) -> dict:
    """Embed every pair of ``datamodule`` with ``model`` (a `SampleEmbedding`) through ``trainer.predict`` and
    score it for poisoning on process 0 (`lit_amdet.sample_scan.score_and_report`); the report dict there, {} on
    the other processes (the arguments are `AmdetTrainer.scan_data`'s). With a ``budget`` the cut's key lists
    (and with ``write_shards`` the filtered shards) go to ``output_dir`` (`lit_amdet.cleaning`). With several
    processes (``--trainer.strategy ddp --trainer.devices N``, or several nodes) every process searches a share
    of the neighbours (`lit_amdet.neighbours.ShardedSearch`: the same lists as one process, bit for bit)."""
    from lit_amdet import cleaning, sample_scan
    from lit_amdet.modules.data_scan import SampleEmbedding
    from lit_amdet.neighbours import ShardedSearch
    from lit_amdet.outliers import PAIR_DETECTORS, check_reference_size, check_same_caption

    if not isinstance(model, SampleEmbedding):
        raise ConfigError(f"scan_data needs --model lit_amdet.modules.data_scan.SampleEmbedding "
                          f"(got {type(model).__name__})")
    if datamodule is None:
        raise ConfigError("scan_data needs data: --data lit_amdet.datamodules.TextEncoderDataModule --data.source ...")
    check_writable_folder(output_dir)
    names = sample_scan.detectors_run(detectors, budget, cut_by)
    modality = model.hparams.modality
    has_images = getattr(datamodule, "has_images", None)
    # Cheap checks before an embedding pass that may take many GPU-minutes.
    pair = [d for d in sample_scan.base_detectors(names) if d in PAIR_DETECTORS]
    if has_images is False and (modality != "text" or pair):
        raise ConfigError(f"{f'the {pair[0]} detector' if modality == 'text' else f'modality {modality!r}'} needs "
                          "images, but the data has none (set data.image_column)")
    if pair and not model.encoder.has_image_tower:
        raise ConfigError(f"the {pair[0]} detector needs an image tower; {model.encoder.name} has none; "
                          "drop it from detectors")
    dataset = getattr(datamodule, "dataset", None)
    if labels is not None and dataset is not None:
        sample_scan.read_labels(labels, len(dataset))
    sample_scan.check_ranges(k, top, chunk_size, len(dataset) if dataset is not None else None)
    try:  # before anything is written to the run folder
        check_same_caption(same_caption)
        if reference_size is not None and dataset is not None:
            check_reference_size(k, reference_size, reference_draws, len(dataset), variant)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # read once, before the embedding pass (the check needs them); gathered predictions come in this same order
    keys = cleaning.sample_keys(datamodule, range(len(dataset))) if budget is not None and dataset is not None \
        else None
    cleaning.check_cut(budget, cut_by, names, len(dataset) if dataset is not None else None, keys)
    shard_writer = cleaning.shard_writer(datamodule, budget, output_dir) if write_shards else None

    predictions = trainer.predict(model, datamodule)
    if not predictions:
        raise LitAmdetError("predict returned nothing (spawn-based strategies return no predictions; "
                            "use strategy: ddp)")
    data = sample_scan.gather_predictions(predictions)
    # every process takes part in the neighbour search (each gathered the whole set); process 0 writes
    search = ShardedSearch(trainer.global_rank, trainer.world_size) if trainer.world_size > 1 else None
    out = Path(output_dir)
    if trainer.is_global_zero:
        sample_scan.unseal(out)
        sample_scan.save_embeddings(out / sample_scan.EMBEDDINGS, data, modality, model.hparams.encoder)
    features = sample_scan.sample_features(data["image"], data["text"], modality)
    image_text = (data["image"], data["text"]) if data["image"] is not None else None
    return sample_scan.score_and_report(
        features, data["caption"], labels, names, k, out, image_text=image_text, indices=data["index"].numpy(),
        image_loader=sample_scan.dataset_image_loader(datamodule), top=top, chunk_size=chunk_size,
        device=trainer.strategy.root_device, log_image=sample_scan.image_logger(trainer.loggers),
        reference_size=reference_size, reference_draws=reference_draws, budget=budget, cut_by=cut_by,
        keys=keys if keys is not None else cleaning.sample_keys(datamodule, data["index"].tolist()),
        write_shards=shard_writer,
        skipped=getattr(datamodule, "skipped", None), variant=variant, dao_form=dao_form,
        search=search, same_caption=same_caption)


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
    lines.append(f"{verdict['model']}: {verdict_word(verdict['verdict'], verdict.get('decided_by'))}")
    return "\n".join(lines)
