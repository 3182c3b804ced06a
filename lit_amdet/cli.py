"""The ``lit-amdet`` command: a plain LightningCLI plus project subcommands.

Subcommands beyond fit/validate/test/predict are methods of `AmdetTrainer`
(LightningCLI builds their arguments from the method signatures). Every error
lit-amdet raises on purpose ends the command with one line on stderr and exit
code 2; no traceback unless ``LIT_AMDET_DEBUG=1``.
"""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import pickle
import sys
from typing import Optional

from jsonargparse import ArgumentError
from jsonargparse.typing import PositiveFloat
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from lit_amdet import commands
from lit_amdet.benchmark import (
    DEFAULT_FEATURES,
    AdaptiveSettings,
    BaseSpec,
    BenchmarkOptions,
    Control,
    DriftSweepSettings,
    ScanSettings,
    Sizes,
    TrainSettings,
    ZooGrid,
)
from lit_amdet.decision import BACKDOORED, INCONCLUSIVE
from lit_amdet.errors import ConfigError, LitAmdetError, first_line
from lit_amdet.interrupts import Interrupted, interruption, signals_stop
from lit_amdet.io import removed_unless
from lit_amdet.loggers import RunTensorBoardLogger
from lit_amdet.outliers import DaoForm, Variant
from lit_amdet.resources import config_path
from lit_amdet.screening import ERROR

EXIT_ERROR = 2
EXIT_BACKDOORED = 1
EXIT_INCONCLUSIVE = 3

#: the shipped config a subcommand reads when the command line has no ``--config`` (``scan_data.yaml`` is not
#: one: its encoder and data paths are placeholders that a fresh install does not have)
DEFAULT_CONFIGS = {"detect": "scan.yaml"}
CONFIG_FLAGS = ("-c", "--config")


class AmdetTrainer(Trainer):
    """Lightning's Trainer with the project's extra subcommands."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for logger in self.loggers:  # the shipped configs' logger writes under the root, wherever it is moved
            if isinstance(logger, RunTensorBoardLogger):
                logger.follow(self.default_root_dir)
        #: its own arguments, so a screening of several suspects makes a fresh Trainer per scan like it
        self.init_kwargs = dict(kwargs)

    def detect(self, model: LightningModule | None = None, datamodule: LightningDataModule | None = None,
               always_exit_zero: bool = False) -> dict:
        """Scan a suspect encoder for an injected textual backdoor (AMDET) and write a verdict.

        Exit code: 0 clean, 1 backdoored, 3 inconclusive (the scan cannot judge, e.g. no anchor), 2 error
        (``--always_exit_zero true``: 0 unless an error).

        Args:
            always_exit_zero: exit 0 for every verdict (it is in report.json and stdout).
        """
        verdict = commands.detect(self, model, datamodule)
        codes = {BACKDOORED: EXIT_BACKDOORED, INCONCLUSIVE: EXIT_INCONCLUSIVE, ERROR: EXIT_ERROR}
        code = codes.get(verdict["verdict"], 0)
        failed = [r for r in verdict.get("rows") or () if r.get("verdict") == ERROR]
        if failed and self.is_global_zero:  # the exit code's reason, on stderr as every other error's
            print(f"lit-amdet: error: {len(failed)} of {len(verdict['rows'])} encoders could not be scanned (the "
                  f"first: {failed[0]['model']}: {failed[0]['decided_by']}); summary: {verdict.get('summary')}",
                  file=sys.stderr)
        # Only process 0 speaks for the run: Lightning's launcher kills every process (SIGKILL) as soon as one
        # of the others exits non-zero, which would cut process 0 off while it writes the summary.
        if code and not always_exit_zero and self.is_global_zero:
            sys.exit(code)
        return verdict

    def inspect(self, model: LightningModule | None = None, datamodule: LightningDataModule | None = None,
                checkpoint: str = "", model_name: str | None = None, allow_pickle: bool = False) -> dict:
        """Load a checkpoint safely and print what it is (family, sizes, context, hash)."""
        facts = commands.inspect(checkpoint, model_name, allow_pickle)
        print(json.dumps(facts, indent=2))
        return facts

    def scan_data(self, model: LightningModule, datamodule: LightningDataModule | None = None,
                  detectors: list[str] = list(commands.DETECTORS),  # noqa: B006, B008
                  k: int = 16, labels: str | None = None, output_dir: str = "runs/scan_data", top: int = 16,
                  chunk_size: int = 1024, reference_size: int | None = None, reference_draws: int = 8,
                  budget: int | float | None = None, cut_by: str = commands.CUT_BY, write_shards: bool = False,
                  variant: Variant = "exact", dao_form: DaoForm = "log",
                  same_caption: float = commands.SAME_CAPTION) -> dict:
        """Score every image-caption pair of a data set for being backdoor-poisoned (sparse kNN neighbourhoods).

        Args:
            detectors: kdist, lid, slof, dao (global exact kNN), iforest, lof, clip (negated pair cosine), xmodal
                (a caption against the captions of its image's k nearest images), xgroup (xmodal averaged over the
                pairs whose captions say the same thing); several joined by + rank as their union (each pair by
                its best rank under them), by * as their rank product (the geometric mean of its ranks), * before
                +, parentheses group: (dao+xgroup)+dao*xgroup.
            k: neighbourhood size.
            labels: poison labels (a poison_labels.json / .npy) to report ROC-AUC, PR-AUC and FPR@95%TPR.
            output_dir: where embeddings.safetensors, scores.csv, report.json and the PNG figures go.
            top: number of top-ranked samples shown and listed.
            chunk_size: query rows per kNN block.
            reference_size: score every sample against random subsamples of this many samples instead of the
                whole set (averaged over reference_draws): poisons sharing a trigger outnumber k and hide
                each other in the whole set; null = the whole set.
            reference_draws: number of subsamples averaged.
            budget: remove the cut_by detector's most anomalous pairs: a fraction in (0, 1) (0.01: the top 1 %,
                rounded up) or a count >= 1; writes keep.txt and flagged.txt (sample keys, data-set order) and
                report.json's "cut" block (with labels: poisons removed, clean pairs lost); null = no cut.
            cut_by: the detector whose ranking picks the cut (one of detectors). (dao+xgroup)+dao*xgroup by
                default: DAO finds poisons isolated from clean pairs (Blend, SIG), xgroup those whose images stay
                near clean ones but whose captions disagree with theirs, pooled over the poisons that share a
                caption (BadNets 8 x 8 at 0.05 %: DAO 7 of 25 in the top 1 %, xgroup 25); half the budget goes
                to what either alone ranks near the top, half to what both rank fairly high (Blend at 0.1 %: the
                union alone 47 of 50, this 50); BENCHMARKS.md "Poisons that two detectors both rank fairly high".
            write_shards: with a budget and webdataset shard input, also write the shards without the flagged
                samples to output_dir/shards/ (same file names).
            variant: exact (neighbours exact and global), or reference: SLOF/DAO/k-dist/LID as the published
                reference code computes them (neighbour indices shifted by one after self-removal, the (k+1)-th
                distance), for comparison (README, "Where our ranking differs from the reference code").
            dao_form: log (SPEC §4 and the reference code) or power (the DAO paper's score, in log scale).
            same_caption: xgroup's caption cosine at or above which two captions say the same thing.
        """
        return commands.scan_data(self, model, datamodule, detectors, k, labels, output_dir, top, chunk_size,
                                  reference_size, reference_draws, budget=budget, cut_by=cut_by,
                                  write_shards=write_shards, variant=variant, dao_form=dao_form,
                                  same_caption=same_caption)

    def benchmark(self, model: LightningModule | None = None, datamodule: LightningDataModule | None = None,
                  bases: Optional[list[BaseSpec]] = None, output_dir: str = "runs/benchmark",
                  zoo_dir: Optional[str] = None, sizes: Sizes = Sizes(), grid: ZooGrid = ZooGrid(),  # noqa: B008
                  train: TrainSettings = TrainSettings(), scan: ScanSettings = ScanSettings(),  # noqa: B008
                  adaptive: AdaptiveSettings = AdaptiveSettings(), controls: list[Control] = [],  # noqa: B006,B008
                  calibration_features: list[str] = list(DEFAULT_FEATURES), seed: int = 0,  # noqa: B006,B008
                  wait_timeout: PositiveFloat = 86400.0,
                  drift_sweep: DriftSweepSettings = DriftSweepSettings()) -> dict | None:  # noqa: B008
        """Detection benchmark: build a zoo of backdoored and benign models, scan each, calibrate, measure.

        Writes ``<output_dir>/benchmark.json`` and ``benchmark.md``. With ``--trainer.strategy ddp
        --trainer.devices N`` (or under torchrun) N processes each build and scan their share of the zoo.

        Args:
            bases: clean bases, ``[{name: minilm, path: minilm}, {name: clip, path: .cache/bases/clip}]``, each with
                an optional ``family`` (clip, longclip, siglip, open_clip, bert) checked against the checkpoint.
            output_dir: plan, caption bank, scans/, calibration.json and the report.
            zoo_dir: the zoo folder (default ``<output_dir>/zoo``); models already there join the benchmark.
            sizes: members per split and base, ``{calibration: {backdoored: 20, benign: 20}, test: {...}}``.
            grid: what members are sampled from (`lit_amdet.benchmark.ZooGrid`: attacks, trigger_kinds,
                attack_steps, backdoor_weights, attack_lrs, benign_lrs, benign_steps, benign_samples).
            train: how members are trained (`lit_amdet.benchmark.TrainSettings`).
            scan: how members are scanned (`lit_amdet.benchmark.ScanSettings`: config, overrides, drift_prompts,
                ...).
            adaptive: adaptive attackers of the test split, reported apart (`lit_amdet.benchmark.AdaptiveSettings`:
                attacks from `lit_amdet.benchmark.ADAPTIVE_ATTACKS`, such as pooled_only, sim_x_penalty,
                pooled_sim_x_penalty, pooled_consistency_penalty, agreeing_target; per_attack; sim_x_penalty;
                consistency_penalty).
            controls: drift-matched benign fine-tunes added to every base's zoo,
                ``[{split: test, lr: 5.0e-5, steps: 20}]`` (`lit_amdet.benchmark.Control`).
            calibration_features: scan scores of the calibrated rule (``log1p_`` prefix: log(1 + score)).
            seed: the zoo plan's seed.
            wait_timeout: seconds process 0 waits for the other processes' scans.
            drift_sweep: members at chosen drift levels from the base (`lit_amdet.benchmark.DriftSweepSettings`:
                benign fine-tunes, typo-robust ones, backdoors planted then fine-tuned or planted during a drifting
                fine-tune; ``per_level: 0``, the default, plans none).
        """
        options = BenchmarkOptions(bases=list(bases or []), output_dir=output_dir, zoo_dir=zoo_dir, sizes=sizes,
                                   grid=grid, train=train, scan=scan, adaptive=adaptive, controls=list(controls),
                                   calibration_features=list(calibration_features), seed=seed,
                                   wait_timeout=wait_timeout, drift_sweep=drift_sweep)
        return commands.benchmark(self, options)


class AmdetCLI(LightningCLI):
    """``lit-amdet``: Lightning's subcommands plus ``detect``, ``inspect`` and ``scan_data``."""

    #: subcommands that run without a LightningModule
    model_optional = ("inspect", "benchmark")
    #: the subcommand on the command line: only its parser is built (all eight cost ~2 s of every command)
    requested: str | None = None

    @classmethod
    def subcommands(cls) -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["detect"] = {"model", "datamodule"}
        commands["inspect"] = {"model", "datamodule"}
        commands["scan_data"] = {"model", "datamodule"}
        commands["benchmark"] = {"model", "datamodule"}
        if cls.requested in commands:
            return {cls.requested: commands[cls.requested]}
        return commands  # none or an unknown one: every parser, so the help or the error lists them all

    def add_core_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        # Not required by the parser so that `inspect` runs without one; checked per subcommand below.
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model,
                                        required=False)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data,
                                        required=False)

    def _run_subcommand(self, subcommand: str) -> None:
        if self.model is None and subcommand not in self.model_optional:
            raise ConfigError(f"{subcommand} needs a model: --model CLASS_PATH or a config with a 'model:' section")
        if subcommand != "fit":
            return super()._run_subcommand(subcommand)
        # Lightning makes the logger's folder (an event file, config.yaml) before any hook can refuse the run
        trainer = self.trainer
        with removed_unless(lambda: trainer.global_step > 0 or not trainer.is_global_zero,
                            trainer.log_dir, trainer.default_root_dir):
            super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        """Lightning's ``--ckpt_path`` (a run to resume), read before any work: a missing or unreadable file is one
        line that names it (torch's own message does not say which file it could not read)."""
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt is not None and ckpt not in ("last", "best", "hpc", "registry") and not os.path.isfile(ckpt):
            raise ConfigError(f"{ckpt}: no such checkpoint to resume from (--ckpt_path)")
        try:
            super()._parse_ckpt_path()
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ConfigError(f"{ckpt}: not a checkpoint this run can resume from ({first_line(exc)})") from None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-amdet`` console script.

    Two things happen to the command line before LightningCLI reads it: ``--config NAME`` where NAME is not a
    file but the name of a shipped config (``scan.yaml``, ``configs/scan.yaml``, ``scan``) becomes that config's
    path (`lit_amdet.resources.config_path`), so the shipped configs work from any folder; and a subcommand of
    `DEFAULT_CONFIGS` given no ``--config`` reads its shipped config as a default config file, so
    ``lit-amdet detect --model.init_args.suspect X --model.init_args.anchor Y`` is the shipped scan. A
    ``--config`` of your own replaces the default config; it is not layered on it.
    """
    # `scan-data` is how people type it; the subcommand is a Trainer method, so its name has an underscore.
    argv = sys.argv if args is None else (args := list(args))
    first = 1 if args is None else 0
    if len(argv) > first and argv[first] == "scan-data":
        argv[first] = "scan_data"
    requested = argv[first] if len(argv) > first else None
    _info_to_stdout()
    try:
        with signals_stop():  # SIGINT and SIGTERM raise Interrupted wherever the command is (lit_amdet.interrupts)
            argv[first:] = shipped_config_args(argv[first:])
            cli_class = type("AmdetCLI", (AmdetCLI,), {"requested": requested})
            cli_class(
                LightningModule,
                LightningDataModule,
                trainer_class=AmdetTrainer,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                args=args,
                auto_configure_optimizers=False,
                seed_everything_default=0,  # a config without a seed: 0, not a random one (and no warning about it)
                # a bad option or config is one line (below), not a usage block
                parser_kwargs={"exit_on_error": False, **default_config_kwargs(cli_class, argv[first:])},
            )
            leave_process_group()
    except LitAmdetError as exc:
        _fail(exc)
    except ArgumentError as exc:
        _fail(exc, limit=600)
    except (SystemExit, KeyboardInterrupt) as exc:
        stop = interruption(exc)  # Lightning answers an interrupt inside fit with sys.exit(1), BACKDOORED's code
        if stop is not None:
            _stopped(stop)
        if isinstance(exc, SystemExit) and exc.code in (None, 0, EXIT_BACKDOORED, EXIT_INCONCLUSIVE):
            leave_process_group()  # a verdict is a normal end
        raise
    except Exception as exc:  # one line, not a traceback wall; LIT_AMDET_DEBUG=1 shows it
        if os.environ.get("LIT_AMDET_DEBUG"):
            raise
        ours = _our_error(exc)  # jsonargparse wraps errors raised while building the model/data
        if ours is not None:
            _fail(ours)
        if isinstance(exc, _INPUT_ERRORS) or type(exc).__name__ == "MisconfigurationException":
            _fail(exc)  # Lightning refusing a trainer setting, a file the user named missing or unreadable
        rank = _stopped_by_peer(exc)
        if rank is not None:
            _fail("stopped: another process of the run failed (its own error, if it printed one, is in this "
                  "output)", prefix=f"process {rank}")
        root = _root_cause(exc)
        _fail(root, prefix=f"unexpected {type(root).__name__}", limit=600)
    finally:
        if args is None:
            quick_exit()


def leave_process_group() -> None:
    """Destroy the process group a DDP run set up, after the command ended normally.

    Without it gloo's worker threads are still alive when the interpreter finalises and a process can abort
    (``terminate called without an active exception``, SIGABRT) after its work is done: a 2-process
    ``scan-data`` failed that way in CI. Only on a normal end: a process that failed may leave a peer blocked in
    a collective, and tearing the group down then could hang instead of exiting with the error.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quick_exit() -> None:
    """Move every object the command made into the collector's permanent generation before the interpreter ends.

    After a command the process holds about half a million objects (torch, transformers, Lightning, torchmetrics
    and what they pull in, the models); the interpreter's last collection at shutdown walks them all: 1.5-3 s
    of a world-base scan's 10-15 s on this project's 2-core machine (BENCHMARKS.md, "Time to a verdict").
    Frozen objects are skipped. Only the console command calls this, after its files are written and closed,
    so nothing it made still needs a finaliser; in-process callers (tests, the benchmark) pass ``args`` and keep
    a collector that frees what they make. Freezing the imported modules before the command runs as well
    changed nothing measurable.
    """
    gc.freeze()


def shipped_config_args(args: list[str]) -> list[str]:
    """``args`` with the value of every ``--config``/``-c`` that names a shipped config replaced by its path.

    A value that is an existing file, a URL (``s3://...``) or an inline config (``{...}``, ``key: value``) is
    kept as given; a ``.yaml``/``.yml``/``.json`` name or a path that is neither a file nor a shipped config is a
    one-line `ConfigError` listing the shipped configs.
    """
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_FLAGS and eq:
            out[i] = f"{flag}={_shipped_config(value)}"
        elif arg in CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = _shipped_config(out[i + 1])
    return out


def _shipped_config(value: str) -> str:
    if os.path.exists(value) or "://" in value or any(c in value for c in "{}:\n"):
        return value
    try:
        return str(config_path(value))
    except ConfigError:
        if value.endswith((".yaml", ".yml", ".json")) or "/" in value or os.sep in value:
            raise
        return value  # jsonargparse says what is wrong with it


def default_config_kwargs(cli_class: type[AmdetCLI], args: list[str]) -> dict[str, dict]:
    """Parser kwargs giving each subcommand of `DEFAULT_CONFIGS` that ``cli_class`` builds its shipped config as
    a default config file; none where ``args`` give a ``--config``."""
    if any(arg.partition("=")[0] in CONFIG_FLAGS for arg in args):
        return {}
    built = cli_class.subcommands()  # LightningCLI hands a key that is not a built subcommand to the main parser
    return {sub: {"default_config_files": [glob.escape(str(config_path(name)))]}
            for sub, name in DEFAULT_CONFIGS.items() if sub in built}


def _info_to_stdout() -> None:
    """Lightning's own info lines ("Seed set to 0", "GPU available: False ...") to stdout, beside the command's
    output: stderr then holds warnings and, for a refused input, the one error line."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.__stderr__:
                handler.setStream(sys.stdout)


#: errors a library raises about the user's own input (a path given on the command line that is missing or not a
#: folder, a resume checkpoint `--ckpt_path` that torch cannot read): an `error:` line like ours, not "unexpected"
_INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, pickle.UnpicklingError)


def _our_error(exc: BaseException) -> LitAmdetError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LitAmdetError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _root_cause(exc: BaseException) -> BaseException:
    """The first exception of ``exc``'s chain: jsonargparse wraps an error raised while it builds the model or
    data in a ValueError whose message holds the whole parsed config ("Does not validate against any of the Union
    subtypes ... Namespace(...)"); the error to name is the one it wraps."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)) is not None \
            and id(inner) not in seen:  # an error raised `from None` hid its context on purpose
        seen.add(id(inner))
        exc = inner
    return exc


def _stopped_by_peer(exc: BaseException) -> int | None:
    """This process's rank when ``exc`` is a collective of a distributed run broken because another process
    died (process 0 failing while it writes, say: that process's own line is the one that matters), else None.
    Only a distributed error (torch's ``DistError``, or gloo's RuntimeError, which names gloo) that says the
    peer went away counts, so a socket error of this process's own (a data-loader worker's reset) is never
    hidden. A peer lost before the process group is set up is not matched (the raw error is printed)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    dist_error = getattr(dist, "DistError", ())
    peer_gone = ("closed by peer", "reset by peer", "remote process exited", "broken pipe")
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        text = str(exc).lower()
        if (isinstance(exc, dist_error) or "gloo" in text) and any(p in text for p in peer_gone):
            return dist.get_rank()
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _worker_unwrapped(message: str) -> str:
    """The message a data-loader worker's error had: torch raises it again in the main process with the worker's
    whole traceback as its message ("Caught ConfigError in DataLoader worker process 0. Original Traceback ...
    lit_amdet.errors.ConfigError: the message"), which is not one line; others as they are."""
    if "Original Traceback (most recent call last):" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.partition(": ")[2] or last


def _stopped(stop: Interrupted) -> None:
    """One line and exit 128 + the signal's number: a stopped command has no verdict and left no partial file."""
    print(f"lit-amdet: stopped by {stop.name}: no verdict; files are written whole or not at all, so what was "
          "not finished is not there", file=sys.stderr)
    sys.exit(stop.exit_code)


def _fail(exc: BaseException | str, prefix: str = "error", limit: int | None = None) -> None:
    message = " ".join(_worker_unwrapped(str(exc)).split()) or type(exc).__name__
    if limit is not None and len(message) > limit:  # jsonargparse lists every alternative it tried
        message = message[:limit] + " ... (LIT_AMDET_DEBUG=1 shows all)"
    print(f"lit-amdet: {prefix}: {message}", file=sys.stderr)
    if os.environ.get("LIT_AMDET_DEBUG") and isinstance(exc, BaseException):
        raise exc
    sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
