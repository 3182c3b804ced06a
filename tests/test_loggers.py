"""Where the shipped configs' TensorBoard logs go: under the Trainer's root, wherever a command moves it."""

from __future__ import annotations

import pytest
import yaml

from lit_amdet.cli import main
from lit_amdet.errors import ConfigError
from lit_amdet.loggers import RunTensorBoardLogger
from lit_amdet.resources import shipped_configs

LOGGER = "lit_amdet.loggers.RunTensorBoardLogger"


def fit_boring(root, *extra: str) -> None:
    main(["fit", "--model", "lightning.pytorch.demos.boring_classes.BoringModel", "--trainer.logger", LOGGER,
          "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.accelerator", "cpu", "--trainer.enable_checkpointing", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra])


def test_the_logs_follow_a_moved_root(tmp_path):
    """Before, a command that gave --trainer.default_root_dir still logged in the config's own folder."""
    fit_boring(tmp_path / "root")
    run = tmp_path / "root" / "tb" / "version_0"
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_a_given_save_dir_wins_over_the_root(tmp_path):
    fit_boring(tmp_path / "root", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"))
    assert list((tmp_path / "logs" / "tb" / "version_0").glob("events.out.tfevents*"))
    assert not (tmp_path / "root" / "tb").exists()


def test_a_second_run_under_the_same_root_takes_the_next_version(tmp_path):
    fit_boring(tmp_path / "root")
    fit_boring(tmp_path / "root")
    assert sorted(p.name for p in (tmp_path / "root" / "tb").iterdir()) == ["version_0", "version_1"]


def test_a_remote_root_needs_an_explicit_save_dir():
    with pytest.raises(ConfigError, match="save_dir"):
        RunTensorBoardLogger().follow("s3://bucket/runs")
    given = RunTensorBoardLogger(save_dir="local")
    given.follow("s3://bucket/runs")  # a given save_dir is kept, so a remote root is no error
    assert given.save_dir == "local"


@pytest.mark.parametrize("config", sorted(p.name for p in shipped_configs().glob("*.yaml")))
def test_every_shipped_logger_follows_the_root(config):
    """A shipped config that named Lightning's logger with its root repeated as save_dir would strand its logs
    again when the root is moved."""
    logger = (yaml.safe_load((shipped_configs() / config).read_text()).get("trainer") or {}).get("logger")
    if isinstance(logger, dict):
        assert logger["class_path"] == LOGGER and "save_dir" not in (logger.get("init_args") or {})


def test_a_scan_with_the_shipped_config_logs_under_its_moved_root(tiny_models, tmp_path, monkeypatch):
    """configs/scan.yaml from an empty folder, the root moved: the run folder and the logs under the root, nothing
    in the folder the command ran from (the logs went to ./runs/scan/tb before). Not a verdict test: the suspect is
    its own anchor so the scan is short."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    clip = str(tiny_models["clip"])
    try:
        main(["detect", "--model.init_args.suspect", clip, "--model.init_args.anchor", clip,
              "--trainer.max_steps", "2", "--data.init_args.num_samples", "200", "--trainer.enable_progress_bar",
              "false", "--trainer.default_root_dir", str(tmp_path / "moved")])
    except SystemExit as exc:  # a verdict's exit code, never an error's
        assert exc.code != 2
    assert (tmp_path / "moved" / "detect" / "clip" / "report.json").is_file()
    assert list((tmp_path / "moved" / "tb" / "version_0").glob("events.out.tfevents*"))
    assert not list(here.iterdir())
