"""Scanning members: the ``detect`` scan anchored on the member's base, built from the scan config as
``lit-amdet detect --config`` builds it (same seed, same defaults), with its run folder kept and the seconds,
peak memory and drift (mean cosine of clean pooled embeddings to the base) recorded.

The scan itself is a callable passed in (``detect(trainer, model, datamodule)``, `lit_amdet.commands.detect`
from the CLI), so this package never imports the command layer.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from lit_amdet.benchmark.members import ZooEntry, zoo_entry
from lit_amdet.benchmark.options import ScanSettings
from lit_amdet.benchmark.plan import ZooBase
from lit_amdet.benchmark.processes import Shard, choose_device, current_shard, one_process, torch_device
from lit_amdet.callbacks.drift import DRIFT_WORLD_SEED, pooled_drift
from lit_amdet.errors import ConfigError
from lit_amdet.io import read_json, read_yaml, write_json
from lit_amdet.resources import config_path

#: ``detect(trainer, model, datamodule)``: runs the scan, writes the run folder, returns the verdict
Detect = Callable[..., dict]


class PeakMemory:
    """Peak resident memory of this process while a block runs (sampled every 20 ms), and peak CUDA memory."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self._cuda:
            self.cuda_peak = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))

    def result(self) -> dict:
        mib = 2 ** 20
        return {"peak_rss_mib": self.peak / mib, "rss_increase_mib": (self.peak - self.start) / mib,
                "cuda_peak_mib": None if self.cuda_peak is None else self.cuda_peak / mib}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the process's lifetime peak is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def clean_cosine_to_base(base, member: str | Path, n_prompts: int = 200, max_length: int = 32,
                         device: str = "cpu") -> float:
    """Drift: mean cosine of clean pooled embeddings, member vs base, on held-out world prompts (1 = unmoved);
    the math is `lit_amdet.callbacks.drift.pooled_drift`, which also stops the drift sweep's training."""
    from lit_amdet.encoders import load_encoder
    from lit_amdet.world import World

    prompts = World(seed=DRIFT_WORLD_SEED).captions(n_prompts)
    reference = load_encoder(base, device=device) if isinstance(base, (str, Path)) else base
    return pooled_drift(reference, load_encoder(member, device=device), prompts, max_length)


def set_dotted(config: dict, values: dict) -> dict:
    """Set ``{"model.init_args.restarts": 1, ...}`` in a nested config dict, in order (a later key wins).

    A class given by name (``rule: lit_amdet.decision.CalibratedRule``) becomes ``{class_path: ...}`` when a
    key below it is set, as on the command line.
    """
    for key, value in (values or {}).items():
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):
                child = {"class_path": child}
            elif not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return config


def scan_config(entry: ZooEntry, base: ZooBase, run_dir: Path, scan: ScanSettings, scratch: str,
                device: tuple[str, int | list[int]], bank: str | Path | None = None) -> dict:
    """The ``detect`` config of one member's scan: ``scan.config`` with the single-device, quiet trainer,
    then ``scan.overrides``, then what makes it the scan of this member (overrides cannot change that): its
    suspect, and its base as the anchor unless ``scan.anchored`` is false (the no-anchor path)."""
    path = config_path(scan.config)
    config = read_yaml(path, "scan config")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a scan config is a mapping")
    set_dotted(config, {"trainer.logger": False, "trainer.enable_progress_bar": False,
                        "trainer.enable_model_summary": False, "trainer.accelerator": device[0],
                        "trainer.devices": device[1]})
    set_dotted(config, scan.overrides)
    member = {"trainer.default_root_dir": scratch, "model.init_args.suspect": str(entry.path),
              "model.init_args.anchor": base.path if scan.anchored else None, "model.init_args.name": entry.name,
              "model.init_args.output_dir": str(run_dir)}
    if bank is not None:
        member["model.init_args.caption_bank"] = str(bank)
    return set_dotted(config, member)


def scan_objects(config: dict) -> tuple[Any, Any, Any]:
    """Trainer, model and datamodule of a ``detect`` config, made as ``lit-amdet detect --config`` makes them:
    Lightning's CLI seeds (``seed_everything``) and fills every default before it builds them."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    class _ConfigCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:  # a dict, never sys.argv
            self.config = parser.parse_object(args)

    cli = _ConfigCLI(LightningModule, None, subclass_mode_model=True, subclass_mode_data=True, run=False,
                     args=config, auto_configure_optimizers=False, save_config_callback=None)
    return cli.trainer, cli.model, cli.datamodule


def scan_member(entry: ZooEntry, base: ZooBase, out_dir: str | Path, scan: ScanSettings | None = None,
                bank: str | Path | None = None, base_encoder=None, *, detect: Detect) -> dict:
    """Scan one member with ``detect`` anchored on its base; keep the run folder.

    Writes ``<out>/scans/<member>/`` (the run folder: report.json, trigger, figures) and
    ``<out>/scans/<member>.json`` (the record: truth, seconds, peak memory, drift). A member whose
    report.json exists is not scanned again.
    """
    scan = scan or ScanSettings()
    scans = Path(out_dir) / "scans"
    run_dir, record_path = scans / entry.name, scans / f"{entry.name}.json"
    report_path = run_dir / "report.json"
    if record_path.is_file() and report_path.is_file():
        return read_json(record_path, "scan record")
    config_path(scan.config)  # a missing scan config fails before anything runs
    device = choose_device(scan.accelerator)
    wall, memory = None, None
    if not report_path.is_file():
        scans.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="lit-amdet-scan-") as scratch:
            config = scan_config(entry, base, run_dir, scan, scratch, device, bank)
            started = time.perf_counter()
            with PeakMemory() as peak, one_process():
                detect(*scan_objects(config))
            wall, memory = time.perf_counter() - started, peak.result()
    report = read_json(report_path, "scan report")
    record = {**entry.facts(), "report": str(report_path),
              "seconds": wall if wall is not None else report["seconds"], "scan_seconds": report["seconds"],
              "memory": memory,
              "clean_cosine_to_base": clean_cosine_to_base(base_encoder if base_encoder is not None else base.path,
                                                           entry.path, scan.drift_prompts, scan.drift_max_length,
                                                           torch_device(device))}
    write_json(record_path, record)
    return record


def scan_zoo(members: Sequence[Path], bases: Sequence[ZooBase], out_dir: str | Path,
             scan: ScanSettings | None = None, bank: str | Path | None = None,
             shard: Shard | None = None, *, detect: Detect) -> list[dict]:
    """Scan this process's round-robin share of the member folders, one model at a time; their records."""
    scan = scan or ScanSettings()
    shard = shard or current_shard()
    by_name = {b.name: b for b in bases}
    encoders: dict[str, Any] = {}  # each base loaded once per process, for the drift
    records = []
    for path in shard.take(members):
        entry = zoo_entry(path, bases)
        if entry is None:
            continue
        base = by_name[entry.base]
        if base.name not in encoders:
            from lit_amdet.encoders import load_encoder

            encoders[base.name] = load_encoder(base.path, device=torch_device(choose_device(scan.accelerator))
                                               ).eval()
        records.append(scan_member(entry, base, out_dir, scan, bank, encoders[base.name], detect=detect))
    return records
