"""The ``lit-amdet`` command: a plain LightningCLI plus project subcommands.

Subcommands beyond fit/validate/test/predict are methods of `AmdetTrainer`
(LightningCLI builds their arguments from the method signatures). Every error
lit-amdet raises on purpose ends the command with one line on stderr and exit
code 2; no traceback unless ``LIT_AMDET_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from lit_amdet.errors import ConfigError, LitAmdetError

EXIT_ERROR = 2


class AmdetTrainer(Trainer):
    """Lightning's Trainer with the project's extra subcommands."""

    def detect(self, model: LightningModule | None = None, datamodule: LightningDataModule | None = None,
               always_exit_zero: bool = False) -> None:
        """Scan a suspect encoder for an injected textual backdoor (AMDET) and write a verdict."""
        raise LitAmdetError("detect is not implemented yet (it lands with the detection issue); no verdict given")

    def inspect(self, model: LightningModule | None = None, datamodule: LightningDataModule | None = None,
                checkpoint: str = "", model_name: str | None = None, allow_pickle: bool = False) -> dict:
        """Load a checkpoint safely and print what it is (family, sizes, context, hash)."""
        from lit_amdet.encoders import file_sha256, load_encoder

        if not checkpoint:
            raise ConfigError("inspect needs --checkpoint PATH (a model folder, or a weights file with --model_name)")
        adapter = load_encoder(checkpoint, model_name=model_name, allow_pickle=allow_pickle)
        facts = adapter.describe()
        facts["sha256"] = file_sha256(adapter.source_path)
        print(json.dumps(facts, indent=2))
        return facts

    def scan_data(self, model: LightningModule, datamodule: LightningDataModule | None = None,
                  detectors: list[str] = ["kdist", "lid", "slof", "dao", "iforest", "lof", "clip"],  # noqa: B006
                  k: int = 16, labels: str | None = None, output_dir: str = "runs/scan_data", top: int = 16,
                  chunk_size: int = 1024) -> dict:
        """Score every image-caption pair of a data set for being backdoor-poisoned (sparse kNN neighbourhoods).

        Args:
            detectors: kdist, lid, slof, dao (global exact kNN), iforest, lof, clip (negated pair cosine).
            k: neighbourhood size.
            labels: poison labels (a poison_labels.json / .npy) to report ROC-AUC, PR-AUC and FPR@95%TPR.
            output_dir: where embeddings.safetensors, scores.csv, report.json and the PNG figures go.
            top: number of top-ranked samples shown and listed.
            chunk_size: query rows per kNN block.
        """
        from lit_amdet.modules.data_scan import run_scan

        return run_scan(self, model, datamodule, detectors, k, labels, output_dir, top, chunk_size)


class AmdetCLI(LightningCLI):
    """``lit-amdet``: Lightning's subcommands plus ``detect``, ``inspect`` and ``scan_data``."""

    #: subcommands that run without a LightningModule
    model_optional = ("inspect",)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["detect"] = {"model", "datamodule"}
        commands["inspect"] = {"model", "datamodule"}
        commands["scan_data"] = {"model", "datamodule"}
        return commands

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
        super()._run_subcommand(subcommand)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-amdet`` console script."""
    try:
        AmdetCLI(
            LightningModule,
            LightningDataModule,
            trainer_class=AmdetTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
        )
    except LitAmdetError as exc:
        _fail(exc)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one line, not a traceback wall; LIT_AMDET_DEBUG=1 shows it
        if os.environ.get("LIT_AMDET_DEBUG"):
            raise
        _fail(exc, prefix=f"unexpected {type(exc).__name__}")


def _fail(exc: BaseException, prefix: str = "error") -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"lit-amdet: {prefix}: {message}", file=sys.stderr)
    if os.environ.get("LIT_AMDET_DEBUG"):
        raise exc
    sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
