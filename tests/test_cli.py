"""The command line: subcommands listed, any LightningModule runs by class_path, errors are one line."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest
import yaml
from lightning.pytorch import LightningModule

from lit_amdet.cli import AmdetCLI, default_config_kwargs, main, shipped_config_args
from lit_amdet.errors import ConfigError
from lit_amdet.resources import shipped_configs


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lit_amdet", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for sub in ("fit", "validate", "test", "predict", "detect", "inspect", "scan_data", "benchmark"):
        assert sub in out.stdout


def test_fit_accepts_any_lightning_module_by_class_path(tmp_path):
    main([
        "fit",
        "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
        "--trainer.fast_dev_run", "1",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.accelerator", "cpu",
    ])


class Exploding(LightningModule):
    """A module whose construction fails the way a library's error does inside jsonargparse's build."""

    def __init__(self, width: int = 4) -> None:
        raise RuntimeError("can't allocate memory: you tried to allocate 68719476736 bytes")


class ExplodingQuietly(LightningModule):
    """A module whose construction fails with an error that hides its context on purpose (``from None``)."""

    def __init__(self, width: int = 4) -> None:
        try:
            {}[width]
        except KeyError:
            raise RuntimeError("the config names no such layer") from None


def test_an_unexpected_error_raised_from_none_is_named_not_the_context_it_hid(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model", "tests.test_cli.ExplodingQuietly", "--trainer.fast_dev_run", "1",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert capsys.readouterr().err.strip() == "lit-amdet: unexpected RuntimeError: the config names no such layer"


def test_an_unexpected_error_while_the_model_is_built_names_it_not_the_parsed_config(tmp_path, capsys):
    """jsonargparse wraps an error raised while it builds the model in a ValueError whose message holds the whole
    parsed config ("Does not validate against any of the Union subtypes ... Namespace(...)"): a config.json
    asking for 64 GiB matrices printed that giant line. The line names the wrapped error instead."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model", "tests.test_cli.Exploding", "--trainer.fast_dev_run", "1",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2
    assert err == "lit-amdet: unexpected RuntimeError: can't allocate memory: you tried to allocate 68719476736 bytes"


def test_inspect_prints_facts(tiny_models, capsys):
    main(["inspect", "--checkpoint", str(tiny_models["longclip"])])
    out = capsys.readouterr().out
    facts = json.loads(out[out.index("{"):])
    assert facts["family"] == "longclip" and facts["context_length"] == 248 and facts["causal"] is True
    assert len(facts["sha256"]) == 64


def test_only_the_console_command_freezes_the_collector(tiny_models, capsys, monkeypatch):
    """`lit_amdet.cli.quick_exit`: the console command (no ``args``) moves its objects out of the collector's
    reach so the interpreter's shutdown does not walk them; an in-process caller (a test, the benchmark) passing
    ``args`` must keep a collector that frees what it made."""
    import gc

    gc.unfreeze()
    main(["inspect", "--checkpoint", str(tiny_models["clip"])])
    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(sys, "argv", ["lit-amdet", "inspect", "--checkpoint", str(tiny_models["clip"])])
    try:
        main()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_detect_needs_the_detection_module(capsys):
    with pytest.raises(SystemExit) as info:
        main(["detect", "--model", "lightning.pytorch.demos.boring_classes.BoringModel"])
    assert info.value.code == 2
    assert "BackdoorDetection" in capsys.readouterr().err.strip().splitlines()[-1]


def test_subcommand_without_model_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--trainer.fast_dev_run", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lit-amdet: error: fit needs a model")


def test_config_names_a_shipped_config_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scan = str(shipped_configs() / "scan.yaml")
    assert shipped_config_args(["detect", "--config", "scan.yaml", "--trainer.max_steps", "3"]) == \
        ["detect", "--config", scan, "--trainer.max_steps", "3"]
    assert shipped_config_args(["detect", "--config=configs/scan.yaml"]) == ["detect", f"--config={scan}"]
    assert shipped_config_args(["-c", "scan", "detect"]) == ["-c", scan, "detect"]


def test_config_that_exists_or_is_inline_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scan.yaml").write_text("model: {}\n")  # your own file wins over the shipped one of that name
    inline = "{trainer: {max_steps: 3}}"
    args = ["detect", "--config", "scan.yaml", "--config", inline, "--config", "s3://bucket/scan.yaml"]
    assert shipped_config_args(args) == args
    with pytest.raises(ConfigError, match="scan.yaml"):  # a file name that is nowhere: the shipped ones listed
        shipped_config_args(["detect", "--config", "nope.yaml"])


def test_detect_defaults_to_the_shipped_scan_config_unless_given_one():
    every = type("AmdetCLI", (AmdetCLI,), {"requested": None})
    assert default_config_kwargs(every, ["detect"]) == \
        {"detect": {"default_config_files": [glob.escape(str(shipped_configs() / "scan.yaml"))]}}
    assert default_config_kwargs(every, ["detect", "--config", "my.yaml"]) == {}
    assert default_config_kwargs(every, ["detect", "-c=my.yaml"]) == {}
    # only for a subcommand that is built: LightningCLI would give the main parser a "detect" kwarg otherwise
    fit_only = type("AmdetCLI", (AmdetCLI,), {"requested": "fit"})
    assert default_config_kwargs(fit_only, ["fit"]) == {}


@pytest.mark.parametrize("config", [[], ["--config", "scan.yaml"], ["--config", "configs/scan.yaml"]])
def test_detect_reads_the_shipped_scan_from_an_empty_folder(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["detect", *config, "--model.init_args.anchor", "minilm", "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load((shipped_configs() / "scan.yaml").read_text())
    assert printed["model"]["class_path"] == shipped["model"]["class_path"]
    assert printed["model"]["init_args"]["suspect"] == shipped["model"]["init_args"]["suspect"]
    assert printed["model"]["init_args"]["anchor"] == "minilm"
    assert printed["trainer"]["default_root_dir"] == shipped["trainer"]["default_root_dir"]
    assert printed["data"]["init_args"]["world_seed"] == shipped["data"]["init_args"]["world_seed"]


def test_unknown_config_name_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["detect", "--config", "nope.yaml"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-amdet: error: nope.yaml: config not found")
    assert "scan.yaml" in err[0]


# Every shipped config whose inputs a fresh install lacks, run as it is from an empty folder: one line that names
# the command making the missing input (or says it is a placeholder), exit 2, and nothing written.
@pytest.mark.parametrize(("command", "config", "names"), [
    ("detect", "scan.yaml", "lit-amdet fit --config attack_text.yaml"),
    ("scan_data", "scan_data.yaml", "placeholder"),
    ("fit", "attack_text.yaml", "make bases"),
    ("fit", "attack_image.yaml", "make bases"),
    ("fit", "finetune.yaml", "make bases"),
    ("fit", "pretrain_poisoned.yaml", "python -m lit_amdet.datamodules.poisoned --out_dir data/badnets"),
])
def test_shipped_config_on_a_fresh_install_names_what_to_run(command, config, names, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([command, "--config", config])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-amdet: error: ") and names in err[0], err
    assert list(tmp_path.iterdir()) == []

