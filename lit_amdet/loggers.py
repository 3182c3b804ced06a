"""A TensorBoard logger whose folder follows the Trainer's ``default_root_dir``.

Why: the shipped configs name their logger (to call its folder ``tb``), and Lightning's `TensorBoardLogger` needs a
``save_dir``, so every config repeated its root there. A command that moved the run with
``--trainer.default_root_dir`` then left its logs behind in the config's folder (``runs/scan/tb`` under the current
directory), unlike Lightning's own default logger, which writes under the root. Here ``save_dir`` left out means
the Trainer's root; given, it wins, as before.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from lit_amdet.errors import ConfigError


class RunTensorBoardLogger(TensorBoardLogger):
    """Lightning's `TensorBoardLogger` (logs in ``save_dir/name/version_N``) with ``save_dir`` optional.

    Args:
        save_dir: where the logs go; None (the default): the ``default_root_dir`` of the Trainer that uses the
            logger (`follow`, called by `lit_amdet.cli.AmdetTrainer`; until then, the current directory).
        name: the folder under ``save_dir`` ("tb").
        **kwargs: Lightning's `TensorBoardLogger` arguments (``version``, ``sub_dir``, ...).
    """

    def __init__(self, save_dir: str | None = None, name: str | None = "tb", **kwargs: Any) -> None:
        super().__init__(save_dir="" if save_dir is None else save_dir, name=name, **kwargs)
        self.follows_root = save_dir is None
        self._trainer_root: str | None = None

    def follow(self, root: str | os.PathLike) -> None:
        """Write under ``root`` (a Trainer's ``default_root_dir``) unless a ``save_dir`` was given. Called before
        anything is logged; a remote root needs an explicit ``save_dir`` (this logger's file system is local)."""
        if not self.follows_root:
            return
        root = os.fspath(root)
        if "://" in root:
            raise ConfigError(f"the TensorBoard logs cannot follow a remote default_root_dir ({root}): "
                              "give --trainer.logger.init_args.save_dir, or --trainer.logger false")
        self._trainer_root = root

    @property
    def save_dir(self) -> str:
        return super().save_dir if self._trainer_root is None else self._trainer_root

    @property
    def root_dir(self) -> str:
        # Lightning's layout: save_dir/name (name "" for none), the version folders under it
        return super().root_dir if self._trainer_root is None else os.path.join(self._trainer_root, self.name)
